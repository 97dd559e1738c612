"""The night: the schedule from config, only the active prompt versions refreshed, nights without new rows
skipped, a failed gate not retrained on the same rows, and a failed run summarised for the person on call."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import ConfigError, load_config
from distill_pipeline.defs import automation
from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import SettingsResource
from distill_pipeline.demo.seed import demo_prompt_keys, seed_demo_table
from distill_pipeline.stages.prompts import PromptError, active_versions, load_prompts

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "distill_pipeline" / "demo" / "demo.yaml"


def _prompt_folder(tmp_path: Path, stems: list[str]) -> Path:
    source = (DEMO_CONFIG.parent / "prompts" / "sec_events_v1.yaml").read_text()
    folder = tmp_path / "prompts"
    folder.mkdir()
    for i, stem in enumerate(stems):  # distinct content -> distinct keys
        (folder / f"{stem}.yaml").write_text(source.replace("stored_as", f"# copy {i}\nstored_as"))
    return folder


def test_active_versions_default_to_the_newest_file_in_natural_order(tmp_path):
    versions = load_prompts(_prompt_folder(tmp_path, ["rubric_v2", "rubric_v9", "rubric_v10"]))
    by_stem = {v.path.stem: v.key for v in versions.values()}
    assert active_versions(versions, ()) == [by_stem["rubric_v10"]]  # not v9, as plain string order would say
    assert active_versions(versions, ("rubric_v2", by_stem["rubric_v9"])) == [by_stem["rubric_v2"], by_stem["rubric_v9"]]
    with pytest.raises(PromptError, match=r"nightly.active_prompt_versions: 'rubric_v3'.*rubric_v10"):
        active_versions(versions, ("rubric_v3",))


def test_nightly_cron_and_time_zone_come_from_config_and_bad_ones_name_the_setting(tmp_path, monkeypatch):
    from distill_pipeline.definitions import build_defs

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DISTILL__NIGHTLY__CRON", "30 1 * * 1-5")
    monkeypatch.setenv("DISTILL__NIGHTLY__TIMEZONE", "Europe/Berlin")
    schedule = build_defs(str(DEMO_CONFIG)).resolve_schedule_def("nightly")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * 1-5", "Europe/Berlin")
    assert schedule.tags[automation.TRIGGER_TAG] == "nightly"

    monkeypatch.setenv("DISTILL__NIGHTLY__CRON", "0 25 * * *")
    with pytest.raises(ConfigError, match=r"nightly.cron='0 25 \* \* \*' is not a cron string"):
        build_defs(str(DEMO_CONFIG))
    monkeypatch.setenv("DISTILL__NIGHTLY__CRON", "0 2 * * *")
    monkeypatch.setenv("DISTILL__NIGHTLY__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError, match=r"nightly.timezone: unknown time zone 'Mars/Olympus'"):
        load_config(DEMO_CONFIG)


@pytest.fixture()
def night(db_url, distill_home, monkeypatch):
    """A demo table, the definitions on it, and a persistent instance: what the daemon would see."""
    monkeypatch.setenv("DISTILL_HOME", str(distill_home))
    monkeypatch.setenv("DATABASE_URL", db_url)
    cfg = load_config(DEMO_CONFIG)
    db = Database(db_url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=400, seed=5)
    from distill_pipeline.definitions import build_defs

    defs = build_defs(str(DEMO_CONFIG))
    instance = dg.DagsterInstance.ephemeral()
    return cfg, db, defs, instance


def _materialize(defs, instance, selection, partition=None, tags=None):
    return dg.materialize(list(defs.assets) + list(defs.asset_checks or []), selection=selection,
                          partition_key=partition, instance=instance, resources=dict(defs.resources),
                          tags=tags or {}, raise_on_error=False)


def _sensor_after(sensor, result, instance, defs, *, failure=False):
    run = instance.get_run_by_id(result.run_id)
    kind = dg.DagsterEventType.RUN_FAILURE if failure else dg.DagsterEventType.RUN_SUCCESS
    event = instance.all_logs(run.run_id, of_type=kind)[0].dagster_event
    context = dg.build_run_status_sensor_context(sensor_name=sensor.name, dagster_event=event, dagster_instance=instance,
                                                 dagster_run=run, resources={"settings": defs.resources["settings"]})
    return sensor(context.for_run_failure() if failure else context)


def _add_rows(db: Database, table: str, n: int, offset: int = 100000) -> None:
    """n new rows, created now (after the watermark), as a night's worth of new teacher outputs."""
    with db.connect() as conn:
        conn.execute(f"INSERT INTO {table} (id, sentence, teacher_output, confidence, prompt_version, created_at) "
                     f"SELECT id + {offset}, sentence || ' (restated {offset})', teacher_output, confidence, "
                     f"prompt_version, now() FROM {table} WHERE id < 100000 ORDER BY id LIMIT {n}")
        conn.commit()


def test_a_night_refreshes_only_the_active_version_and_a_night_without_new_rows_pays_nothing(night):
    cfg, db, defs, instance = night
    v1, v2 = demo_prompt_keys(cfg.prompts_dir)
    sensor = defs.resolve_sensor_def("refresh_after_export")

    first = _materialize(defs, instance, ["source_rows"], tags={automation.TRIGGER_TAG: "nightly"})
    assert first.success
    version_1 = automation.current_source_version(instance)
    result = _sensor_after(sensor, first, instance, defs)
    requests = result.run_requests
    assert [r.partition_key for r in requests] == [v2]  # the newest prompt file only: v1 is not retrained
    assert requests[0].tags == {automation.TRIGGER_TAG: "nightly", automation.PROMPT_VERSION_TAG: v2,
                                automation.SOURCE_VERSION_TAG: version_1, automation.RETRAIN_TAG: "yes"}
    assert requests[0].asset_selection is None  # a new version: the whole chain
    assert result.dynamic_partitions_requests[0].partition_keys == [v2]
    instance.add_dynamic_partitions(prompt_versions.name, [v2])
    # The requested run, as the daemon would launch it (the data half: training is the same chain, longer).
    built = _materialize(defs, instance, ["teacher_labels", "curated_examples", "dataset_splits"], v2,
                         tags=requests[0].tags)
    assert built.success
    splits = cfg.stage_dir("dataset_splits", v2) / "train.parquet"
    before = splits.stat().st_mtime_ns

    # Night 2: no new rows. The export re-reads its overlap window, writes the same bytes, and the refresh skips.
    second = _materialize(defs, instance, ["source_rows"], tags={automation.TRIGGER_TAG: "nightly"})
    assert second.success
    assert automation.current_source_version(instance) == version_1
    skip = _sensor_after(sensor, second, instance, defs)
    assert isinstance(skip, dg.SkipReason) and "already built from these rows" in skip.skip_message
    assert splits.stat().st_mtime_ns == before

    # Night 3: new rows -> a new data version -> v2 is refreshed again.
    _add_rows(db, cfg.source.table, 4)
    third = _materialize(defs, instance, ["source_rows"], tags={automation.TRIGGER_TAG: "nightly"})
    assert automation.current_source_version(instance) != version_1
    again = _sensor_after(sensor, third, instance, defs)
    assert [r.partition_key for r in again.run_requests] == [v2]

    # Configured active versions: both, by file name (stable across edits of the file).
    import os

    os.environ["DISTILL__NIGHTLY__ACTIVE_PROMPT_VERSIONS"] = "[sec_events_v1, sec_events_v2]"
    try:
        both = _sensor_after(sensor, third, instance, defs)
    finally:
        del os.environ["DISTILL__NIGHTLY__ACTIVE_PROMPT_VERSIONS"]
    assert sorted(r.partition_key for r in both.run_requests) == sorted([v1, v2])


def test_a_night_of_few_new_rows_refreshes_the_data_incrementally_and_retrains_later(night):
    cfg, db, defs, instance = night
    v2 = demo_prompt_keys(cfg.prompts_dir)[1]
    sensor = defs.resolve_sensor_def("refresh_after_export")
    instance.add_dynamic_partitions(prompt_versions.name, [v2])
    assert _materialize(defs, instance, ["source_rows"]).success
    assert _materialize(defs, instance, list(automation.DATA_ASSETS), v2).success
    # the student of v2 was trained from these 400 rows
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="student_adapter", partition=v2, metadata={"source_rows_total": 400}))

    _add_rows(db, cfg.source.table, 4)  # 1% new rows
    night_1 = _materialize(defs, instance, ["source_rows"], tags={automation.TRIGGER_TAG: "nightly"})
    request = _sensor_after(sensor, night_1, instance, defs).run_requests[0]
    assert request.asset_selection == [dg.AssetKey(a) for a in automation.DATA_ASSETS]
    assert request.tags[automation.RETRAIN_TAG].startswith("not yet")
    reason = automation.retrain_decision(instance, v2, cfg.nightly.retrain_min_new_rows_share)
    assert "grew 1.00%" in reason and "nightly.retrain_min_new_rows_share=0.05" in reason
    # the daemon runs what was requested: the data stages, each judging only the new rows
    assert _materialize(defs, instance, list(automation.DATA_ASSETS), v2, tags=request.tags).success
    curated = json.loads((cfg.stage_dir("curated_examples", v2) / "manifest.json").read_text())
    splits = json.loads((cfg.stage_dir("dataset_splits", v2) / "manifest.json").read_text())
    assert curated["mode"] == "incremental" and curated["rows_new_or_changed"] == 4
    assert splits["mode"] == "incremental"

    _add_rows(db, cfg.source.table, 20, offset=200000)  # 6% since the adapter: retrain
    night_2 = _materialize(defs, instance, ["source_rows"], tags={automation.TRIGGER_TAG: "nightly"})
    request = _sensor_after(sensor, night_2, instance, defs).run_requests[0]
    assert request.asset_selection is None and request.tags[automation.RETRAIN_TAG] == "yes"


@dg.asset(partitions_def=prompt_versions, check_specs=[dg.AssetCheckSpec("bar", asset="student_verdict", blocking=True)])
def student_verdict():
    yield dg.MaterializeResult()
    yield dg.AssetCheckResult(check_name="bar", passed=False, metadata={"headline": 0.88, "bar": 0.95})


@dg.asset(partitions_def=prompt_versions)
def flaky_worker():
    raise RuntimeError("pod evicted: node drained")


class _Webhook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_gate_is_not_retrained_on_the_same_rows_a_crash_is_and_both_are_summarised(night, monkeypatch):
    cfg, _db, defs, instance = night
    v1, v2 = demo_prompt_keys(cfg.prompts_dir)
    instance.add_dynamic_partitions(prompt_versions.name, [v2])
    exported = _materialize(defs, instance, ["source_rows"])
    version = automation.current_source_version(instance)
    tags = {automation.SOURCE_VERSION_TAG: version, automation.TRIGGER_TAG: "nightly"}

    gate = dg.materialize([student_verdict], partition_key=v2, instance=instance, tags=tags, raise_on_error=False)
    assert not gate.success
    reason = automation.refresh_decision(instance, v2, version)
    assert reason and "failed the gate on these rows" in reason
    assert "failed the gate" in _sensor_after(defs.resolve_sensor_def("refresh_after_export"), exported, instance,
                                              defs).skip_message

    crash = dg.materialize([flaky_worker], partition_key=v2, instance=instance, tags=tags, raise_on_error=False)
    assert not crash.success
    assert automation.refresh_decision(instance, v2, version) is None  # an outage, not a verdict: run it again

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(cfg.alerts.webhook_url_env, f"http://127.0.0.1:{server.server_port}/hooks/T0K3N")
    _Webhook.received = []
    try:
        alert = defs.resolve_sensor_def("alert_on_failure")
        _sensor_after(alert, crash, instance, defs, failure=True)
        latest = (cfg.home / "alerts" / "latest.md").read_text()
        assert f"[{v2}]: run FAILED" in latest and "flaky_worker: " in latest and "pod evicted: node drained" in latest
        assert f"distill materialize --partition {v2}" in latest
        assert [m["text"] for m in _Webhook.received] == [latest]

        _sensor_after(alert, gate, instance, defs, failure=True)
        latest = (cfg.home / "alerts" / "latest.md").read_text()
        assert "student below the bar" in latest and "student_verdict.bar: {\"bar\": 0.95, \"headline\": 0.88}" in latest
        assert len(_Webhook.received) == 1  # a verdict is summarised, not paged
        assert len(list((cfg.home / "alerts").glob("*-*.md"))) == 2
    finally:
        server.shutdown()


def test_a_failure_summary_never_carries_a_database_password():
    from dagster._utils.error import SerializableErrorInfo

    from distill_pipeline import alerts

    cause = SerializableErrorInfo("OperationalError: connection to postgresql://etl:s3cret@db:5432/prod failed\n",
                                  [], "OperationalError")
    wrapped = SerializableErrorInfo("DagsterExecutionStepExecutionError: Error occurred\n", [],
                                    "DagsterExecutionStepExecutionError", cause=cause)
    line = alerts.error_line(wrapped)
    assert line.startswith("OperationalError: connection to postgresql://etl:") and "s3cret" not in line
    summary = alerts.RunFailure(run_id="r" * 32, job="refresh", partition=None, trigger="nightly",
                                run_error="could not reach postgresql://etl:s3cret@db/prod", failed_steps=[]).text()
    assert "s3cret" not in summary and "could not reach" in summary
