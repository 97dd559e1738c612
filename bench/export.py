"""Export throughput: source_rows rows/s ÷ `psql \\copy (SELECT ...) TO '/dev/null' (FORMAT binary)` rows/s.

Same table, same SELECT (the one source_rows issues), alternated runs, best of
each. Our export runs in a child process so its peak RSS is its own.

    .venv/bin/python bench/export.py --rows 1000000 [--database-url URL]

Without --database-url (or BENCH_DATABASE_URL) an embedded pgserver is used.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distill_pipeline.clients.postgres import Database, quote_table  # noqa: E402
from distill_pipeline.config import load_config  # noqa: E402
from distill_pipeline.demo.seed import seed_demo_table  # noqa: E402
from distill_pipeline.stages.source_rows import build_query  # noqa: E402

CHILD = """
import json, resource, sys
from pathlib import Path
from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import load_config
from distill_pipeline.stages.source_rows import export_source_rows
cfg = load_config()
r = export_source_rows(Database(sys.argv[1]), cfg.source, Path(sys.argv[2]))
print(json.dumps({"rows": r.rows_read, "seconds": r.seconds, "shards": r.shards, "bytes": r.bytes_total,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def psql_binary() -> str:
    found = shutil.which("psql")
    if found:
        return found
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql")


def time_psql(url: str, sql: str) -> float:
    started = time.perf_counter()
    subprocess.run([psql_binary(), url, "-v", "ON_ERROR_STOP=1", "-q", "-c",
                    f"\\copy ({sql}) TO '/dev/null' (FORMAT binary)"], check=True)
    return time.perf_counter() - started


def run_ours(url: str, out_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, url, str(out_dir)], check=True, capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-export-"))
    url = args.database_url
    if url is None:
        import pgserver

        url = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete").get_uri()
    cfg = load_config(env={})
    db = Database(url)
    table = cfg.source.table
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        have = conn.execute(f"SELECT count(*) FROM {quote_table(table)}").fetchone()[0] if exists else 0
    if have != args.rows:
        if exists:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"DROP TABLE {quote_table(table)}")
        t0 = time.perf_counter()
        # ~1 day per 25k rows: realistic day buckets at any size.
        seed_demo_table(db, table, cfg.prompts_dir, rows=args.rows, spread_days=max(1, args.rows / 25_000))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"VACUUM ANALYZE {quote_table(table)}")
        print(f"seeded {args.rows} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    sql = build_query(cfg.source, since=None)
    psql_s, ours = [], []
    for i in range(args.repeats):
        psql_s.append(time_psql(url, sql))
        ours.append(run_ours(url, workdir / "out"))
        print(f"run {i}: psql {psql_s[-1]:.2f}s  ours {ours[-1]['seconds']:.2f}s "
              f"(peak {ours[-1]['peak_rss_mb']:.0f} MB)", file=sys.stderr)
    best_psql = min(psql_s)
    best_ours = min(ours, key=lambda r: r["seconds"])
    psql_rate = args.rows / best_psql
    our_rate = best_ours["rows"] / best_ours["seconds"]
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({
        "ratio_vs_psql_copy": round(our_rate / psql_rate, 3),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ours), 1),
        "rows": best_ours["rows"],
        "rows_per_s": round(our_rate),
        "psql_rows_per_s": round(psql_rate),
        "parquet_bytes": best_ours["bytes"],
        "shards": best_ours["shards"],
    }))


if __name__ == "__main__":
    main()
