"""source_rows against a real Postgres: incremental, late rows, idempotent, crash-safe."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import load_config
from distill_pipeline.demo.seed import seed_demo_table
from distill_pipeline.stages.source_rows import build_query, export_source_rows, read_manifest, read_source_rows

REPO = Path(__file__).resolve().parent.parent


def make_cfg(home, **source):
    env = {"DISTILL_HOME": str(home)}
    for key, value in source.items():
        env[f"DISTILL__SOURCE__{key.upper()}"] = str(value)
    return load_config(env=env)


def shard_digests(stage_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(stage_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(stage_dir.glob("day=*/*.parquet"))}


def exported_ids(cfg) -> list[int]:
    return read_source_rows(cfg, columns=["id"]).column("id").to_pylist()


def test_incremental_export_adds_exactly_the_new_rows(db_url, distill_home):
    cfg = make_cfg(distill_home)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=400, seed=1)
    first = export_source_rows(db, cfg.source, cfg.stage_dir("source_rows"))
    assert first.rows_total == 400 and sorted(exported_ids(cfg)) == list(range(1, 401))

    # 100 new rows, later in time (the generator's timeline continues with spread_days)
    with psycopg.connect(db_url) as conn:
        conn.execute(f"""INSERT INTO {cfg.source.table}
            SELECT id + 400, sentence, teacher_output, confidence, prompt_version, created_at + interval '60 days'
            FROM {cfg.source.table} WHERE id <= 100""")
    second = export_source_rows(db, cfg.source, cfg.stage_dir("source_rows"))
    ids = exported_ids(cfg)
    assert sorted(ids) == list(range(1, 501)) and len(ids) == len(set(ids))
    assert second.rows_read < 500  # only the re-read window and the new rows were read
    assert second.watermark["id"] == 500


def test_late_row_inside_the_overlap_window_is_not_missed(db_url, distill_home):
    cfg = make_cfg(distill_home, overlap_seconds=3600)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=200, seed=2)
    first = export_source_rows(db, cfg.source, cfg.stage_dir("source_rows"))
    with psycopg.connect(db_url) as conn:  # committed after the export, stamped 10 minutes before its watermark
        conn.execute(f"INSERT INTO {cfg.source.table} (id, sentence, teacher_output, confidence, prompt_version, "
                     "created_at) VALUES (9999, 'late row', '{\"skip\": true}', 9, 'v', %s)",
                     (datetime.fromisoformat(first.watermark["created_at"]) - timedelta(minutes=10),))
    export_source_rows(db, cfg.source, cfg.stage_dir("source_rows"))
    ids = exported_ids(cfg)
    assert 9999 in ids and len(ids) == 201 == len(set(ids))


def test_rerun_gives_identical_shards_and_matches_a_fresh_export(db_url, distill_home, tmp_path):
    cfg = make_cfg(distill_home, shard_rows=128)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=1500, seed=3, spread_days=3)
    stage = cfg.stage_dir("source_rows")
    export_source_rows(db, cfg.source, stage)
    before = shard_digests(stage)
    again = export_source_rows(db, cfg.source, stage)
    assert again.rows_read > 0 and shard_digests(stage) == before
    fresh = tmp_path / "fresh"
    export_source_rows(db, cfg.source, fresh)
    assert shard_digests(fresh) == before
    assert len(before) > 3  # several days, several shards per day


def test_killed_export_then_rerun_equals_one_clean_run(db_url, distill_home, tmp_path):
    cfg = make_cfg(distill_home, shard_rows=2048, parallel_streams=1)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=150_000, seed=4, spread_days=30)
    stage = cfg.stage_dir("source_rows")
    code = ("import sys; from pathlib import Path; from distill_pipeline.clients.postgres import Database;"
            "from distill_pipeline.config import load_config;"
            "from distill_pipeline.stages.source_rows import export_source_rows;"
            "cfg = load_config(); export_source_rows(Database(sys.argv[1]), cfg.source, Path(sys.argv[2]))")
    env = {**os.environ, "DISTILL_HOME": str(distill_home), "DISTILL__SOURCE__SHARD_ROWS": "2048",
           "DISTILL__SOURCE__PARALLEL_STREAMS": "1"}
    killed_mid_way = False
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code, db_url, str(stage)], env=env, cwd=REPO)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if any(stage.glob(".staging-*/day=*/*.parquet")):
                break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_mid_way = True
            break
        proc.wait()
    assert killed_mid_way, "the export always finished before it could be killed"
    assert read_manifest(stage) is None  # the manifest is written last: nothing claims to be complete
    assert list(stage.glob(".staging-*"))  # half-written files were left in staging only

    export_source_rows(db, cfg.source, stage)
    clean = tmp_path / "clean"
    export_source_rows(db, cfg.source, clean)
    assert not list(stage.glob(".staging-*"))
    assert shard_digests(stage) == shard_digests(clean)
    assert sorted(exported_ids(cfg)) == list(range(1, 150_001))


def test_killed_incremental_export_keeps_the_previous_manifest(db_url, distill_home, tmp_path):
    cfg = make_cfg(distill_home)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=300, seed=5)
    stage = cfg.stage_dir("source_rows")
    export_source_rows(db, cfg.source, stage)
    manifest = read_manifest(stage)
    # simulate a run killed after staging some files for the new range
    (stage / ".staging-dead" / "day=2099-01-01").mkdir(parents=True)
    (stage / ".staging-dead" / "day=2099-01-01" / "part-00000.parquet").write_bytes(b"half")
    assert read_manifest(stage) == manifest
    again = export_source_rows(db, cfg.source, stage)
    assert not (stage / ".staging-dead").exists() and again.rows_total == 300


def test_filters_and_mapping_come_from_config(db_url, distill_home):
    with psycopg.connect(db_url) as conn:
        conn.execute('CREATE TABLE "Events" (event_id bigint, body bytea, answer jsonb, score numeric, '
                     'ts timestamp NOT NULL)')
        conn.execute("""INSERT INTO "Events" VALUES
            (1, 'hello', '{"skip": true}', 9, '2026-01-01 10:00'),
            (2, 'low', '{"skip": true}', 3, '2026-01-01 11:00'),
            (3, '\\xff00'::bytea, NULL, 9.5, '2026-01-02 09:00')""")
    env = {"DISTILL_HOME": str(distill_home), "DISTILL__SOURCE__TABLE": "public.Events",
           "DISTILL__SOURCE__COLUMNS": "{id: event_id, input: body, output: answer, confidence: score, "
                                       "prompt_version: null, created_at: ts}",
           "DISTILL__SOURCE__MIN_CONFIDENCE": "5"}
    cfg = load_config(env=env)
    sql = build_query(cfg.source, None)
    assert '"Events"' in sql and '"score" >= 5.0' in sql
    result = export_source_rows(Database(db_url), cfg.source, cfg.stage_dir("source_rows"))
    table = read_source_rows(cfg)
    assert result.rows_total == 2 and table.column("id").to_pylist() == [1, 3]
    assert table.column("input").to_pylist() == [b"hello", b"\xff\x00"]  # bytea stays bytes
    assert table.column("output").to_pylist()[0] == '{"skip": true}'


def test_missing_table_is_a_clear_error(db_url, distill_home):
    cfg = make_cfg(distill_home, table="nowhere")
    with pytest.raises(Exception, match="nowhere"):
        export_source_rows(Database(db_url), cfg.source, cfg.stage_dir("source_rows"))
