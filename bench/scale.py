"""The data half at scale: wall time and peak RSS per stage at two sizes, and the slope between them.

    .venv/bin/python bench/scale.py [--rows 2000000] [--small-share 0.25] [--database-url URL]

Seeds the demo generator's rows in a database of its own: first rows x small-share, then the rest. After
each, a fresh home runs source_rows, teacher_labels (stored answers reused, the demo teacher for the
rest), curated_examples and dataset_splits for the newest prompt version, each stage in a child process
through the entry point its asset calls, and records the stage's wall time and the child's own peak RSS
(wait4). Per stage: `wall_s` and `peak_rss_mb` at both sizes, `rss_mb_per_1m_rows` (the slope between the
sizes; bounded memory means ~0) and `projected_s_at_11_8m` (the larger size's rows/s carried to 11.8M rows: a
stage whose rows/s falls between the two sizes grows faster than its rows and is under-projected).

Without --database-url (or BENCH_DATABASE_URL) an embedded pgserver is used. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ["source_rows", "teacher_labels", "curated_examples", "dataset_splits"]
TARGET_ROWS = 11_800_000


def run_stage(stage: str, version: str) -> None:
    """In the child: one stage through its entry point (home and database from the environment)."""
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.config import load_config

    cfg = load_config()
    if stage == "source_rows":
        from distill_pipeline.stages.source_rows import build_source_rows

        build_source_rows(cfg, Database.from_config(cfg))
    elif stage == "teacher_labels":
        from distill_pipeline.clients.teacher import DemoTeacher
        from distill_pipeline.stages.teacher_labels import build_teacher_labels

        with DemoTeacher().open(cfg.teacher) as endpoint:
            build_teacher_labels(cfg, version, Database.from_config(cfg), endpoint)
    elif stage == "curated_examples":
        from distill_pipeline.stages.curated_examples import build_curated_examples

        build_curated_examples(cfg, version)
    elif stage == "dataset_splits":
        from distill_pipeline.stages.dataset_splits import build_dataset_splits

        build_dataset_splits(cfg, version)
    else:
        raise SystemExit(f"unknown stage {stage}")


def measure(stage: str, version: str, env: dict[str, str]) -> dict:
    """Wall seconds and peak RSS (MB) of one stage in a child process of its own."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--child", stage, "--version", version], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{stage} failed (exit {child.returncode})")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def data_half(rows: int, version: str, url: str, workdir: Path) -> dict[str, dict]:
    # a home and a label-cache schema of its own per size: the second size must not reuse the first one's labels
    env = {**os.environ, "DISTILL_HOME": str(workdir / f"home-{rows}"), "DATABASE_URL": url,
           "DISTILL__DATABASE__SCHEMA_NAME": f"distill_{rows}", "HF_HUB_OFFLINE": "1"}
    out = {}
    for stage in STAGES:
        out[stage] = measure(stage, version, env)
        print(f"{rows:>11,} rows  {stage:17s} {out[stage]['wall_s']:8.1f} s  {out[stage]['peak_rss_mb']:6d} MB",
              file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--small-share", type=float, default=0.25)
    ap.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--version", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_stage(args.child, args.version)

    from bench_database import own_database
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.config import load_config
    from distill_pipeline.demo.seed import seed_demo_table
    from distill_pipeline.stages.prompts import active_versions, load_prompts

    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    url = own_database(args.database_url, workdir, "bench_scale")
    cfg = load_config(env={"DISTILL_HOME": str(workdir / "seed-home"), "DATABASE_URL": url})
    db = Database(url)
    version = active_versions(load_prompts(cfg.prompts_dir), cfg.nightly.active_prompt_versions)[0]

    small = max(1, int(args.rows * args.small_share))
    results = {}
    seeded = 0
    for size in (small, args.rows):
        started = time.perf_counter()
        seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=size - seeded, seed=11 + seeded,
                        first_id=seeded + 1)
        print(f"seeded {size - seeded:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        seeded = size
        results[size] = data_half(size, version, url, workdir)

    per_stage = {}
    span = (args.rows - small) / 1e6
    for stage in STAGES:
        a, b = results[small][stage], results[args.rows][stage]
        per_stage[stage] = {
            "wall_s": {str(small): a["wall_s"], str(args.rows): b["wall_s"]},
            "peak_rss_mb": {str(small): a["peak_rss_mb"], str(args.rows): b["peak_rss_mb"]},
            "rows_per_s": {str(small): round(small / a["wall_s"]), str(args.rows): round(args.rows / b["wall_s"])},
            "rss_mb_per_1m_rows": round((b["peak_rss_mb"] - a["peak_rss_mb"]) / span, 1) if span else None,
            "projected_s_at_11_8m": round(b["wall_s"] * TARGET_ROWS / args.rows, 1),
        }
    total = {str(size): round(sum(results[size][s]["wall_s"] for s in STAGES), 1) for size in results}
    print(json.dumps({"rows": args.rows, "small_rows": small, "prompt_version": version, "stages": per_stage,
                      "data_half_s": total,
                      "projected_data_half_s_at_11_8m": round(sum(v["projected_s_at_11_8m"]
                                                                  for v in per_stage.values()), 1),
                      "peak_rss_mb_max": max(v["peak_rss_mb"][str(args.rows)] for v in per_stage.values())}))


if __name__ == "__main__":
    main()
