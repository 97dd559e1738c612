"""Teacher client throughput against the demo teacher on loopback with a fixed answer latency.

At concurrency C and latency L an ideal client completes C / L requests per second (64 / 0.2 s = 320).
We report our client's requests/s ÷ that ideal, and ÷ the same client at concurrency 1 (sequential).
The server runs in its own process (aiohttp, asyncio.sleep latency) so it is not the bottleneck; it
also reports the peak number of requests it saw in flight.

With --database-url (or BENCH_DATABASE_URL) the whole labelling stage is timed too (cache lookups,
batched commits to Postgres, Parquet), against the same server and ideal.

    .venv/bin/python bench/teacher.py [--requests 3200] [--concurrency 64] [--latency-ms 200]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distill_pipeline.clients.teacher import ChatRequest, TeacherClient, map_completions  # noqa: E402
from distill_pipeline.demo.data import generate_rows  # noqa: E402
from distill_pipeline.demo.teacher_server import spawn_teacher_server  # noqa: E402
from distill_pipeline.stages.prompts import load_prompts  # noqa: E402

PROMPTS = REPO / "distill_pipeline" / "demo" / "prompts"


def sentences(n: int, seed: int) -> list[str]:
    out, seen = [], set()
    for row in generate_rows(n * 3, seed):
        if row.sentence and row.sentence.strip() and row.sentence not in seen:
            seen.add(row.sentence)
            out.append(row.sentence)
            if len(out) == n:
                break
    return out


def client_rate(url: str, texts: list[str], concurrency: int) -> tuple[float, float]:
    """(requests/s, seconds) of the client alone: every request of `texts` through map_completions."""
    prompt = sorted(load_prompts(PROMPTS).values(), key=lambda p: p.path.name)[-1]

    async def go() -> float:
        async with TeacherClient(url, None, concurrency=concurrency, timeout_s=30) as client:
            items = ((i, ChatRequest(prompt.messages(t), prompt.teacher.model, prompt.teacher.max_tokens))
                     for i, t in enumerate(texts))
            started = time.perf_counter()
            ok = 0
            async for _, done in map_completions(client, items):
                ok += done.ok
            seconds = time.perf_counter() - started
        if ok != len(texts):
            raise SystemExit(f"{len(texts) - ok} requests failed against the demo teacher")
        return seconds

    seconds = asyncio.run(go())
    return len(texts) / seconds, seconds


def stage_rate(url: str, database_url: str, n: int, concurrency: int, seed: int) -> tuple[float, float]:
    """(requests/s, seconds) of label_partition: n distinct inputs, all requested, answers committed to Postgres."""
    import pyarrow as pa
    import yaml

    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.config import DEFAULT_CONFIG_FILE, load_config
    from distill_pipeline.stages.teacher_labels import label_partition

    schema = f"bench_teacher_{os.getpid()}"
    with tempfile.TemporaryDirectory() as home:
        data = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
        data.update(home=home, prompts_dir=str(PROMPTS), database={"url": database_url, "schema_name": schema},
                    teacher={"base_url": url, "concurrency": concurrency, "progress": False, "timeout_s": 30})
        path = Path(home) / "bench.yaml"
        path.write_text(yaml.safe_dump(data))
        cfg = load_config(path, env={})
        prompt = sorted(load_prompts(PROMPTS).values(), key=lambda p: p.path.name)[-1]
        texts = sentences(n, seed)
        table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "input": texts})
        db = Database(database_url, schema)
        try:
            started = time.perf_counter()
            run = label_partition(cfg, prompt, table, db)
            seconds = time.perf_counter() - started
        finally:
            with db.connect(autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    if run.counts["requested"] != n:
        raise SystemExit(f"stage requested {run.counts['requested']} of {n}")
    return n / seconds, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3200)
    p.add_argument("--sequential-requests", type=int, default=25)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    a = p.parse_args()

    ideal = a.concurrency / (a.latency_ms / 1000.0)
    texts = sentences(a.requests, seed=7)
    server = spawn_teacher_server(0, args=["--latency-ms", str(a.latency_ms), "--rows", str(a.requests * 3)])
    try:
        client_rate(server.url, texts[: a.concurrency], a.concurrency)  # warm-up: connections, caches
        server.reset()
        rate, seconds = client_rate(server.url, texts, a.concurrency)
        peak = server.stats()["peak_in_flight"]
        seq_rate, seq_seconds = client_rate(server.url, texts[: a.sequential_requests], 1)
        stage = stage_rate(server.url, a.database_url, a.requests, a.concurrency, 7) if a.database_url else None
    finally:
        server.stop()

    print(f"demo teacher on loopback, latency {a.latency_ms:g} ms; ideal at concurrency {a.concurrency}: "
          f"{ideal:.1f} requests/s")
    print(f"client, concurrency {a.concurrency}:  {a.requests} requests in {seconds:.2f} s = {rate:.1f} requests/s "
          f"(peak in flight at the server: {peak})")
    print(f"client, concurrency 1:   {a.sequential_requests} requests in {seq_seconds:.2f} s = {seq_rate:.2f} requests/s")
    figures = {"ratio_vs_ideal": round(rate / ideal, 4), "ratio_vs_sequential": round(rate / seq_rate, 2),
               "requests": a.requests, "seconds": round(seconds, 3), "requests_per_s": round(rate, 1),
               "ideal_requests_per_s": round(ideal, 1), "sequential_requests_per_s": round(seq_rate, 2),
               "concurrency": a.concurrency, "latency_ms": a.latency_ms, "peak_in_flight": peak}
    if stage:
        print(f"labelling stage (Postgres cache, Parquet), concurrency {a.concurrency}: {a.requests} inputs in "
              f"{stage[1]:.2f} s = {stage[0]:.1f} requests/s")
        figures.update(stage_ratio_vs_ideal=round(stage[0] / ideal, 4), stage_seconds=round(stage[1], 3))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
