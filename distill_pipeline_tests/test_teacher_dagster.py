"""teacher_labels in Dagster: the prompt sensor registers versions and backfills them; the key stays secret."""

import hashlib
import logging
import shutil
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow.parquet as pq

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import DEFAULT_CONFIG_FILE
from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import PostgresResource, SettingsResource
from distill_pipeline.defs.assets import teacher_labels
from distill_pipeline.defs.automation import prompt_versions_sensor
from distill_pipeline.defs.resources import OpenAITeacherResource as TeacherResource
from distill_pipeline.demo.seed import seed_demo_table
from distill_pipeline.demo.teacher_server import demo_answers, start_teacher_server
from distill_pipeline.stages.source_rows import export_source_rows
from distill_pipeline.stages.teacher_labels import labels_path, read_labels
from distill_pipeline_tests.test_teacher_labels import cache_rows, load, write_config

DEMO_PROMPTS = DEFAULT_CONFIG_FILE.parent / "prompts"
ROWS = 150


@dg.asset(partitions_def=prompt_versions, deps=["teacher_labels"])
def label_summary(context: dg.AssetExecutionContext, settings: SettingsResource) -> dg.MaterializeResult:
    """A downstream asset, so the test can see the sensor's runs cover what follows teacher_labels."""
    table = read_labels(settings.load(), context.partition_key, ["status"])
    return dg.MaterializeResult(metadata={"rows": table.num_rows})


def build_defs(config: Path, teacher: TeacherResource) -> dg.Definitions:
    settings = SettingsResource(config_file=str(config))
    resources = {"settings": settings, "postgres": PostgresResource(settings=settings), "teacher": teacher}
    return dg.Definitions(assets=[teacher_labels, label_summary], sensors=[prompt_versions_sensor], resources=resources)


def prepare(tmp_path: Path, db_url: str, base_url: str):
    """Demo table (rows under v1 and v2) in Postgres, exported; a watched prompts folder holding only v1."""
    watched = tmp_path / "prompts"
    watched.mkdir()
    shutil.copy(DEMO_PROMPTS / "sec_events_v1.yaml", watched)
    config = write_config(tmp_path, db_url, prompts_dir=watched, base_url=base_url,
                          price_per_1m_input_tokens=0.2, price_per_1m_output_tokens=0.6)
    cfg = load(config)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, DEMO_PROMPTS, rows=ROWS, seed=7)
    export_source_rows(db, cfg.source, cfg.stage_dir("source_rows"))
    return config, cfg, watched


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, config: Path):
    """One sensor evaluation, applied to the instance the way the daemon applies it."""
    context = dg.build_sensor_context(instance=instance,
                                      resources={"settings": SettingsResource(config_file=str(config))})
    result = prompt_versions_sensor(context)
    if isinstance(result, dg.SkipReason):
        return [], result
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result.run_requests, result


def launch(defs: dg.Definitions, instance: dg.DagsterInstance, run_request: dg.RunRequest):
    job = defs.resolve_job_def(prompt_versions_sensor.job_name)
    result = job.execute_in_process(instance=instance, partition_key=run_request.partition_key,
                                    tags=run_request.tags)
    assert result.success
    return {m.asset_key.to_user_string(): m for m in result.asset_materializations_for_node("teacher_labels")
            + result.asset_materializations_for_node("label_summary")}


def dagster_instance(tmp_path: Path):
    """A real on-disk instance (sqlite event log, compute logs) under tmp_path/dagster."""
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return dg.instance_for_test(temp_dir=str(tmp_path / "dagster"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_prompt_file_becomes_a_partition_and_is_backfilled(tmp_path, db_url):
    answers = demo_answers(ROWS, 7)
    with start_teacher_server(0, answers=answers, latency_s=0.0) as server, \
            dagster_instance(tmp_path) as instance:
        config, cfg, watched = prepare(tmp_path, db_url, server.url)
        defs = build_defs(config, TeacherResource())
        dg.Definitions.validate_loadable(defs)

        requests, _ = tick(defs, instance, config)
        (v1,) = instance.get_dynamic_partitions("prompt_version")
        assert [r.partition_key for r in requests] == [v1]
        done = launch(defs, instance, requests[0])
        assert set(done) == {"teacher_labels", "label_summary"}  # the run covers the downstream assets
        v1_file, v1_digest, v1_cache = labels_path(cfg, v1), digest(labels_path(cfg, v1)), cache_rows(db_url, v1)

        assert tick(defs, instance, config)[0] == []  # nothing new: no run

        shutil.copy(DEMO_PROMPTS / "sec_events_v2.yaml", watched)
        server.reset()
        requests, _ = tick(defs, instance, config)
        v2 = next(k for k in instance.get_dynamic_partitions("prompt_version") if k != v1)
        assert [r.partition_key for r in requests] == [v2]
        done = launch(defs, instance, requests[0])
        meta = {k: v.value for k, v in done["teacher_labels"].metadata.items()}

        # Everything labelled under v2: rows stored under v2 reused, all others asked of the teacher.
        table = pq.read_table(labels_path(cfg, v2))
        assert table.num_rows == ROWS and set(table.column("prompt_version").to_pylist()) == {v2}
        sources = table.column("source").to_pylist()
        assert meta["reused"] == sources.count("reused") > 0
        assert meta["requested"] == sources.count("requested") == server.stats()["requests"] > 0
        assert meta["run_cost_usd"] > 0 and meta["latency_p95_ms"] >= meta["latency_p50_ms"]
        assert done["label_summary"].metadata["rows"].value == ROWS
        # The old version's labels and cache are untouched.
        assert digest(v1_file) == v1_digest and cache_rows(db_url, v1) == v1_cache
        assert set(instance.get_materialized_partitions(dg.AssetKey("teacher_labels"))) == {v1, v2}

        # A second materialization of the same partition sends nothing.
        server.reset()
        again = launch(defs, instance, dg.RunRequest(partition_key=v2))
        assert server.stats()["requests"] == 0
        assert again["teacher_labels"].metadata["requested"].value == 0
        assert again["teacher_labels"].metadata["cached"].value == meta["requested"] + meta["cached"]

        # Editing a prompt makes a new version; the old partitions stay.
        edited = watched / "sec_events_v2.yaml"
        edited.write_text(edited.read_text() + "  Answer in English.\n")
        requests, _ = tick(defs, instance, config)
        assert len(requests) == 1 and requests[0].partition_key not in (v1, v2)
        assert {v1, v2} < set(instance.get_dynamic_partitions("prompt_version"))


def test_malformed_prompt_file_is_reported_and_blocks_no_other(tmp_path, db_url):
    watched = tmp_path / "prompts"
    watched.mkdir()
    shutil.copy(DEMO_PROMPTS / "sec_events_v1.yaml", watched)
    (watched / "broken.yaml").write_text("system: hi\n")  # no user_template, no teacher.model
    config = write_config(tmp_path, db_url, prompts_dir=watched)
    with dagster_instance(tmp_path) as instance:
        requests, _ = tick(build_defs(config, TeacherResource()), instance, config)
        assert len(requests) == 1 and requests[0].partition_key.startswith("sec_events_v1-")


def grep_tree(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_api_key_never_reaches_logs_metadata_or_files(tmp_path, db_url, monkeypatch, caplog, capfd):
    key = "sk-distill-test-7f3c9a1e5b2d4f60-NEVER-LOG-ME"
    monkeypatch.setenv("TEST_TEACHER_KEY", key)
    caplog.set_level(logging.DEBUG)
    answers = demo_answers(ROWS, 7)
    with start_teacher_server(0, answers=answers, latency_s=0.0, api_key=key) as server, \
            dagster_instance(tmp_path) as instance:
        config, cfg, watched = prepare(tmp_path, db_url, server.url)
        defs = build_defs(config, TeacherResource.from_env("TEST_TEACHER_KEY"))
        requests, _ = tick(defs, instance, config)
        done = launch(defs, instance, requests[0])
        assert server.stats()["outcomes"].get("ok", 0) > 0  # the key was sent and accepted
        assert "unauthorized" not in server.stats()["outcomes"]

        # A wrong key: the server echoes it in its 401 body; the failure must not carry it on.
        wrong = "sk-wrong-key-0a1b2c3d4e5f-ECHOED-BY-SERVER"
        monkeypatch.setenv("TEST_TEACHER_KEY", wrong)
        bad_defs = build_defs(config, TeacherResource.from_env("TEST_TEACHER_KEY"))
        job = bad_defs.resolve_job_def(prompt_versions_sensor.job_name)
        shutil.copy(DEMO_PROMPTS / "sec_events_v2.yaml", watched)
        (request,) = tick(bad_defs, instance, config)[0]
        failed = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                        raise_on_error=False)
        assert not failed.success
        assert "HTTP 401" in str(failed.get_step_failure_events()[0].event_specific_data.error)

        runs = [r.run_id for r in instance.get_runs()]
        events = [dg.serialize_value(e) for run_id in runs for e in instance.all_logs(run_id)]
        metadata = str({k: v.value for k, v in done["teacher_labels"].metadata.items()})

    with psycopg.connect(db_url) as conn:
        cache_dump = str(conn.execute("SELECT * FROM distill.label_cache").fetchall())
    assert cache_dump.count("qwen2.5") > 0  # the dump holds the answers checked below
    out, err = capfd.readouterr()
    # Positive controls: the places searched do hold this run's logs and labels.
    assert grep_tree(tmp_path / "dagster", b"labelled:") and "teacher" in caplog.text + err
    for secret in (key, wrong):
        assert secret not in caplog.text and secret not in out and secret not in err
        assert not any(secret in e for e in events) and secret not in metadata
        assert grep_tree(tmp_path, secret.encode()) == []  # event log db, compute logs, artifacts, configs
        assert secret not in cache_dump
    assert "***" in str(failed.get_step_failure_events()[0].event_specific_data.error)
