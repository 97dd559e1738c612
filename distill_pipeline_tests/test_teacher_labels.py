"""teacher_labels stage against a real demo teacher on loopback and a real Postgres label cache."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import DEFAULT_CONFIG_FILE, load_config
from distill_pipeline.demo.data import generate_rows, source_table
from distill_pipeline.demo.teacher_server import Faults, demo_answers, start_teacher_server
from distill_pipeline.stages.teacher_labels import hash_input, label_partition, read_labels
from distill_pipeline.stages.prompts import load_prompts

ROWS, SEED = 300, 11


def write_config(tmp_path: Path, db_url: str, prompts_dir: Path | None = None, **teacher) -> Path:
    """The demo config pointed at a test database, home and prompts folder; `teacher` overrides."""
    data = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    data["home"] = str(tmp_path / "home")
    data["prompts_dir"] = str(prompts_dir or DEFAULT_CONFIG_FILE.parent / "prompts")
    data["database"] = {"url": db_url, "schema_name": teacher.pop("schema_name", "distill")}
    data["teacher"] = {"progress": False, "timeout_s": 2.0, "backoff_initial_s": 0.02, "backoff_max_s": 0.5,
                       **teacher}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"config-{data['database']['schema_name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load(path: Path):
    return load_config(path, env={})  # no environment override leaks into a test


def demo_versions(cfg):
    prompts = load_prompts(cfg.prompts_dir)
    v1, v2 = sorted(prompts.values(), key=lambda p: p.path.name)[:2]
    return v1, v2


def demo_table(n: int, seed: int, versions: tuple[str, str], first_id: int = 1) -> pa.Table:
    return source_table(list(generate_rows(n, seed, versions)), first_id)


def cache_rows(db_url: str, prompt_version: str, schema: str = "distill") -> dict[str, tuple]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(f'SELECT input_hash, status, output, error FROM "{schema}".label_cache '
                            "WHERE prompt_version = %s", (prompt_version,)).fetchall()
    return {r[0]: r[1:] for r in rows}


@pytest.fixture(scope="module")
def answers():
    return demo_answers(ROWS, SEED)


def test_faulty_teacher_every_input_labelled_or_recorded(tmp_path, db_url, answers):
    # 20% of requests fail at the transport level (429 with Retry-After, 500, hangs past the client
    # timeout, truncated and non-JSON bodies) and 3% more answer broken JSON.
    faults = Faults(rate_429=0.05, rate_500=0.05, rate_timeout=0.03, rate_truncated=0.04, rate_nonjson=0.03,
                    rate_bad_answer=0.03, retry_after_s=0.05, hang_s=3.0)
    with start_teacher_server(0, answers=answers, latency_s=0.01, faults=faults, fault_seed=3) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, concurrency=8, max_attempts=2,
                                timeout_s=0.5, price_per_1m_input_tokens=1.0, price_per_1m_output_tokens=2.0))
        v1, v2 = demo_versions(cfg)
        table = demo_table(ROWS, SEED, (v1.key, v1.key))  # everything stored under v1: v2 asks for all
        run = label_partition(cfg, v2, table, Database(db_url))
        stats = server.stats()

    labels = read_labels(cfg, v2.key)
    assert labels.num_rows == ROWS and labels.column("id").to_pylist() == list(range(1, ROWS + 1))
    rows = labels.to_pylist()
    statuses = Counter(r["status"] for r in rows)
    assert set(statuses) <= {"ok", "invalid", "failed", "invalid_input"}
    # Every fault kind happened, some inputs ran out of attempts, some answers were broken JSON.
    assert {"429", "500", "timeout", "truncated", "nonjson", "bad_answer"} <= set(stats["outcomes"])
    assert statuses["failed"] > 0 and statuses["invalid"] > 0 and statuses["ok"] > ROWS // 2
    for r in rows:
        if r["status"] == "invalid_input":
            assert r["source"] == "skipped" and r["error"] and r["input_hash"] is None
            continue
        assert r["input_hash"] == hash_input(r["input"])
        if r["status"] == "failed":
            assert r["output"] is None and r["error"].startswith("gave up after 2 attempts")
        elif r["status"] == "invalid":
            assert r["output"] and "not valid JSON" in r["error"]  # raw text kept with the reason
        else:
            assert json.loads(r["output"]) == answers[r["input"].strip()]
            assert r["confidence"] == 9.0 and r["cost_usd"] > 0 and r["tokens_in"] > 0
    # The cache holds exactly one row per distinct valid input, with the same status as the file.
    cache = cache_rows(db_url, v2.key)
    distinct = {r["input_hash"]: r["status"] for r in rows if r["input_hash"]}
    assert set(cache) == set(distinct)
    assert all(cache[h][0] == status for h, status in distinct.items())
    meta = run.metadata()
    assert meta["requested"] == len(distinct) and meta["failed"] == statuses["failed"]
    assert meta["run_cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows if r["source"] == "requested"),
                                                 rel=1e-6)
    assert meta["latency_p95_ms"] >= meta["latency_p50_ms"] > 0


def test_second_run_sends_nothing_and_failed_keys_are_retried(tmp_path, db_url, answers):
    with start_teacher_server(0, answers=answers, latency_s=0.0, faults=Faults(rate_500=1.0)) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, max_attempts=2))
        v1, v2 = demo_versions(cfg)
        table = demo_table(60, SEED, (v1.key, v2.key))
        first = label_partition(cfg, v2, table, Database(db_url))
        failed = cache_rows(db_url, v2.key)
        assert failed and {status for status, _, _ in failed.values()} == {"failed"}
        assert {r["status"] for r in read_labels(cfg, v2.key).to_pylist() if r["source"] == "requested"} == {"failed"}
    # The teacher recovers: a re-run asks again only for the failed keys.
    with start_teacher_server(0, answers=answers, latency_s=0.0) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url))
        second = label_partition(cfg, v2, table, Database(db_url))
        assert server.stats()["requests"] == len(failed) == second.counts["requested"]
        assert second.counts["failed"] == 0
        server.reset()
        third = label_partition(cfg, v2, table, Database(db_url))
        assert server.stats()["requests"] == 0
        assert third.counts["requested"] == 0 and third.http_requests == 0
    assert read_labels(cfg, v2.key).column("output").to_pylist() == \
        pq.read_table(third.path).column("output").to_pylist()


def test_reuse_cache_and_invalid_inputs(tmp_path, db_url, answers):
    with start_teacher_server(0, answers=answers, latency_s=0.0) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url))
        v1, v2 = demo_versions(cfg)
        table = demo_table(ROWS, SEED, (v1.key, v2.key))
        bad = pa.table({"id": pa.array([-1, -2, -3], pa.int64()),
                        "input": pa.array([b"\xff\xfe not utf-8", b"   ", "Plain text sentence?".encode()]),
                        "output": pa.array([None, None, None], pa.string()),
                        "confidence": pa.array([None, None, None], pa.float64()),
                        "prompt_version": pa.array([None, None, None], pa.string()),
                        "created_at": table.column("created_at").slice(0, 3)})
        binary = pa.concat_tables([table.cast(table.schema.set(1, pa.field("input", pa.binary()))), bad])
        run = label_partition(cfg, v2, binary, Database(db_url))
        requested = server.stats()["sentences"]

    labels = {r["id"]: r for r in read_labels(cfg, v2.key).to_pylist()}
    assert len(labels) == ROWS + 3
    assert labels[-1]["status"] == "invalid_input" and "UTF-8" in labels[-1]["error"]
    assert labels[-2]["status"] == "invalid_input" and labels[-2]["error"] == "input is empty"
    assert labels[-3]["status"] == "ok" and labels[-3]["output"] == '{"skip": true}'
    stored = table.to_pylist()
    v2_inputs = {r["input"] for r in stored if r["prompt_version"] == v2.key and r["input"] and r["input"].strip()}
    for r in stored:
        label = labels[r["id"]]
        if r["input"] is None or not r["input"].strip():
            assert label["status"] == "invalid_input"
        elif r["prompt_version"] == v2.key:
            assert label["source"] == "reused" and label["output"] == r["output"]
            assert label["confidence"] == r["confidence"] and label["cost_usd"] == 0
        elif r["input"] in v2_inputs:  # same text stored under v2 elsewhere in the table: free
            assert label["source"] == "reused"
        else:
            assert label["source"] in ("requested", "cached")
    # One request per distinct text that was neither reused nor cached.
    assert sum(requested.values()) == run.counts["requested"] == len(cache_rows(db_url, v2.key))


def test_budget_stops_new_requests_and_a_rerun_finishes(tmp_path, db_url, answers):
    prices = dict(price_per_1m_input_tokens=100.0, price_per_1m_output_tokens=100.0)
    with start_teacher_server(0, answers=answers, latency_s=0.01) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, concurrency=4, budget_usd=0.5, **prices))
        v1, v2 = demo_versions(cfg)
        table = demo_table(150, SEED, (v1.key, v1.key))
        run = label_partition(cfg, v2, table, Database(db_url))
        sent = server.stats()["requests"]
        assert run.budget_reached and run.counts["over_budget"] > 0 and run.not_sent > 0
        assert 0 < run.run_cost_usd <= 0.5
        assert sent == run.counts["requested"]  # the paid answers are all kept
        assert len(cache_rows(db_url, v2.key)) == sent
        over = [r for r in read_labels(cfg, v2.key).to_pylist() if r["status"] == "over_budget"]
        assert over and all(r["output"] is None and "budget" in r["error"] for r in over)

        server.reset()
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, concurrency=4, **prices))
        rerun = label_partition(cfg, v2, table, Database(db_url))
        assert not rerun.budget_reached and rerun.counts["over_budget"] == 0
        assert server.stats()["requests"] == run.not_sent == rerun.counts["requested"]


def test_sample_is_sticky_and_grows_only_by_new_rows(tmp_path, db_url, answers):
    with start_teacher_server(0, answers=answers, latency_s=0.0) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, sample_size=40))
        v1, v2 = demo_versions(cfg)
        table = demo_table(200, SEED, (v1.key, v1.key))
        first = label_partition(cfg, v2, table, Database(db_url))
        ids_first = set(read_labels(cfg, v2.key, ["id"]).column("id").to_pylist())
        assert first.rows == len(ids_first) == 40
        # 100 more rows arrive: the 40 stay, and only new rows join (about 40/200 of them).
        grown = demo_table(300, SEED, (v1.key, v1.key))
        second = label_partition(cfg, v2, grown, Database(db_url))
        ids_second = set(read_labels(cfg, v2.key, ["id"]).column("id").to_pylist())
        assert ids_first < ids_second and min(ids_second - ids_first) > 200
        assert second.sample_threshold == first.sample_threshold
        # Other prompt versions sample the same rows, so their students compare on the same inputs.
        label_partition(cfg, v1, table, Database(db_url))
        assert set(read_labels(cfg, v1.key, ["id"]).column("id").to_pylist()) == ids_first


def test_two_runs_of_one_partition_at_once_pay_once(tmp_path, db_url, answers):
    with start_teacher_server(0, answers=answers, latency_s=0.02) as server:
        cfg = load(write_config(tmp_path, db_url, base_url=server.url, concurrency=4))
        v1, v2 = demo_versions(cfg)
        table = demo_table(ROWS, SEED, (v1.key, v1.key))
        runs, errors = [], []

        def work():
            try:
                runs.append(label_partition(cfg, v2, table, Database(db_url)))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(runs) == 2
        distinct = len(cache_rows(db_url, v2.key))
        stats = server.stats()
        assert stats["requests"] == distinct
        assert sorted(r.counts["requested"] for r in runs) == [0, distinct]
        assert max(r.lock_wait_s for r in runs) > 0
