"""A labelling run killed with SIGKILL half way, then re-run: only the missing keys are asked again, and an
answer the killed run received is paid for again only if it was in flight at the kill."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pyarrow.parquet as pq

from distill_pipeline.clients.label_cache import WRITER_APP_NAME
from distill_pipeline.clients.postgres import Database
from distill_pipeline.demo.teacher_server import Faults, demo_answers, start_teacher_server
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
        config = write_config(tmp_path, db_url, base_url=server.url, concurrency=4,
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


# Double billing after kill -9 -----------------------------------------------------------------------

CONCURRENCY = 4
# Complete answers delivered to a run before it is killed: mid-run, and off the multiples of 50 where the
# old batched writer (50 answers or 1 s) happened to have nothing pending.
KILL_AFTER = 130
FAULTS = Faults(rate_429=0.03, rate_500=0.03, rate_truncated=0.02, rate_bad_answer=0.02, retry_after_s=0.05)


def kill_after_answers(server, config, db_url: str, prompt_version: str, source, answers: int,
                       stall_s: float = 0.0) -> dict:
    """Run the stage in a child, SIGKILL it once the server has delivered `answers` complete answers to it
    (with requests on the wire), wait for the server to finish what was in flight; the server's stats.
    `stall_s`: before the kill, hold a lock that blocks every commit to the label cache for that long."""
    server.reset()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(config), prompt_version, str(source)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        stats = server.stats()
        if sum(stats["answered"].values()) >= answers and stats["in_flight"]:
            break
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child got no answers"
        time.sleep(0.01)
    with psycopg.connect(db_url) as conn:
        if stall_s:  # a stalled Postgres (lock, slow disk): answers keep arriving, none can be committed
            conn.execute("LOCK TABLE distill.label_cache IN EXCLUSIVE MODE")
            time.sleep(stall_s)
        os.kill(child.pid, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
    child.stdout.close()
    while server.stats()["in_flight"]:  # the server finishes what was in flight (its answers reach nobody)
        assert time.monotonic() < deadline, "requests never finished at the server"
        time.sleep(0.01)
    return server.stats()


def double_billing_after_kills(tmp_path, db_url, stalls: tuple[float, ...] = (0.0, 0.5)) -> list[int]:
    """Label through a faulty teacher, SIGKILL the run once per entry of `stalls` (that long a commit stall
    before the kill), then finish it; for each kill, the number of inputs whose complete answer the killed
    run was sent and that the next run asked again."""
    answers = demo_answers(ROWS, SEED)
    with start_teacher_server(0, answers=answers, latency_s=0.05, faults=FAULTS, fault_seed=3) as server:
        config = write_config(tmp_path, db_url, base_url=server.url, concurrency=CONCURRENCY, max_attempts=20,
                              price_per_1m_input_tokens=0.5, price_per_1m_output_tokens=1.5)
        cfg = load(config)
        v1, v2 = demo_versions(cfg)
        table = demo_table(ROWS, SEED, (v1.key, v1.key))
        table = table.drop_columns(["output", "prompt_version"])  # nothing to reuse: every input is bought
        source = tmp_path / "source.parquet"
        pq.write_table(table, source)

        runs = [kill_after_answers(server, config, db_url, v2.key, source, KILL_AFTER, stall) for stall in stalls]
        for stats in runs:
            assert max(stats["answered"].values()) == 1  # no input answered twice within one run
        server.reset()
        final = label_partition(cfg, v2, table, Database(db_url))
        runs.append(server.stats())

    labels = read_labels(cfg, v2.key).to_pylist()
    all_keys = {r["input_hash"] for r in labels if r["input_hash"]}
    assert committed(db_url, v2.key) == all_keys
    assert final.counts["requested"] > 0  # the kills really left work for the last run
    return [len(set(killed["answered"]) & set(rerun["sentences"])) for killed, rerun in itertools.pairwise(runs)]


def test_kill_9_pays_again_at_most_the_requests_in_flight(tmp_path, db_url):
    # A request in flight at the kill may be answered and billed, yet never reach the run: the re-run
    # must buy it again. Every answer the run did receive must be durable in the label cache by then,
    # or at least hold back new requests while it is not (second kill: during a commit stall).
    doubles = double_billing_after_kills(tmp_path, db_url)
    assert all(d <= CONCURRENCY for d in doubles), doubles


def test_lost_label_cache_connection_fails_the_run_instead_of_hanging(tmp_path, db_url):
    # Requests wait for their answers to be saved; when saving becomes impossible they must fail,
    # not wait forever for a slot.
    answers = demo_answers(ROWS, SEED)
    with start_teacher_server(0, answers=answers, latency_s=0.02) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, concurrency=CONCURRENCY))
        v1, v2 = demo_versions(cfg)
        table = demo_table(ROWS, SEED, (v1.key, v1.key)).drop_columns(["output", "prompt_version"])
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["run"] = label_partition(cfg, v2, table, Database(db_url))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while len(committed(db_url, v2.key)) < 40:
            assert worker.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.01)
        with psycopg.connect(db_url) as lock, psycopg.connect(db_url, autocommit=True) as conn:
            # Stall the commits until every slot is held by an unsaved answer (nothing left on the
            # wire to fail the run), then cut the writer's connection.
            lock.execute("LOCK TABLE distill.label_cache IN EXCLUSIVE MODE")
            while server.stats()["in_flight"]:
                assert time.monotonic() < deadline, "requests kept going while no answer could be saved"
                time.sleep(0.01)
            killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND application_name = %s",
                                  (WRITER_APP_NAME,)).fetchall()
        assert killed == [(True,)]
        worker.join(60)
        assert not worker.is_alive(), "the run hung after losing its label cache connection"
    assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
    assert len(committed(db_url, v2.key)) >= 40  # what was saved before stays saved
