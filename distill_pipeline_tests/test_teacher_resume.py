"""A labelling run killed with SIGKILL half way, then re-run: only the missing keys are asked again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pyarrow.parquet as pq

from distill_pipeline.clients.postgres import Database
from distill_pipeline.demo.teacher_server import demo_answers, start_teacher_server
from distill_pipeline.stages.teacher_labels import label_partition, read_labels
from distill_pipeline_tests.conftest import REPO
from distill_pipeline_tests.test_teacher_labels import demo_table, demo_versions, load, write_config

ROWS, SEED = 400, 5

CHILD = """
import sys
import pyarrow.parquet as pq
from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import load_config
from distill_pipeline.stages.teacher_labels import label_partition
from distill_pipeline.stages.prompts import load_prompts

cfg = load_config(sys.argv[1], env={})
label_partition(cfg, load_prompts(cfg.prompts_dir)[sys.argv[2]], pq.read_table(sys.argv[3]), Database.from_config(cfg))
"""

COMPARED = ["id", "input_hash", "output", "confidence", "status", "error", "tokens_in", "tokens_out", "cost_usd"]


def committed(db_url: str, prompt_version: str) -> set[str]:
    with psycopg.connect(db_url) as conn:
        try:
            rows = conn.execute("SELECT input_hash FROM distill.label_cache WHERE prompt_version = %s",
                                (prompt_version,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return set()
    return {r[0] for r in rows}


def test_killed_run_then_rerun_requests_only_missing_keys(tmp_path, db_url):
    answers = demo_answers(ROWS, SEED)
    with start_teacher_server(0, answers=answers, latency_s=0.03) as server:
        config = write_config(tmp_path, db_url, base_url=server.url, concurrency=4, commit_batch=10,
                              price_per_1m_input_tokens=0.5, price_per_1m_output_tokens=1.5)
        cfg = load(config)
        v1, v2 = demo_versions(cfg)
        table = demo_table(ROWS, SEED, (v1.key, v1.key))
        source = tmp_path / "source.parquet"
        pq.write_table(table, source)

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(config), v2.key, str(source)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len(committed(db_url, v2.key)) < 60:
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child committed nothing"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
        child.stdout.close()
        time.sleep(0.3)  # let requests already on the wire land before counting starts again

        done_before = committed(db_url, v2.key)
        server.reset()
        rerun = label_partition(cfg, v2, table, Database(db_url))
        asked = server.stats()["sentences"]

    labels = read_labels(cfg, v2.key).to_pylist()
    all_keys = {r["input_hash"] for r in labels if r["input_hash"]}
    missing = all_keys - done_before
    assert 0 < len(done_before) < len(all_keys)  # really killed half way
    text_of = {r["input_hash"]: r["input"].strip() for r in labels if r["input_hash"]}
    assert sum(asked.values()) == len(missing) == rerun.counts["requested"]
    assert set(asked) == {text_of[k] for k in missing}
    assert committed(db_url, v2.key) == all_keys

    # The same labels as one clean run into a fresh cache (another schema) and home.
    with start_teacher_server(0, answers=answers, latency_s=0.0) as server:
        clean_cfg = load(write_config(tmp_path / "clean", db_url, base_url=server.url, schema_name="clean",
                                      price_per_1m_input_tokens=0.5, price_per_1m_output_tokens=1.5))
        label_partition(clean_cfg, v2, table, Database(db_url, "clean"))
    resumed = read_labels(cfg, v2.key, COMPARED).sort_by("id")
    clean = read_labels(clean_cfg, v2.key, COMPARED).sort_by("id")
    assert resumed.num_rows == ROWS
    assert resumed.equals(clean)
