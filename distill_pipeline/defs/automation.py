"""What starts runs, and what a failed one leaves behind.

- schedule `nightly` (cron and time zone from config `nightly`) exports new rows;
- sensor `refresh_after_export`: after a successful export, one run per *active* prompt version
  (config nightly.active_prompt_versions; default the newest) for everything downstream of source_rows,
  skipped for a version already built from exactly these rows (a night without new rows pays nothing);
  the student is retrained only once the source has grown by nightly.retrain_min_new_rows_share since its
  adapter was trained, else the run refreshes the data stages only (a night of 1% new rows pays for 1%);
- sensor `prompt_versions_sensor`: a new prompt file -> a partition and its backfill;
- sensor `alert_on_failure`: a failed run -> a summary file under <home>/alerts (and a webhook post).

Runs carry the tag `distill/trigger`, so the run queue in dagster.yaml can bound how many of each kind run at once.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from distill_pipeline.config import ConfigError, NightlyConfig
from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import SettingsResource
from distill_pipeline import alerts
from distill_pipeline.stages.prompts import PROMPT_SUFFIXES, PromptError, active_versions, load_prompt, load_prompts

TRIGGER_TAG = "distill/trigger"
SOURCE_VERSION_TAG = "distill/source_data_version"
PROMPT_VERSION_TAG = "distill/prompt_version"
RETRAIN_TAG = "distill/retrain"  # "yes", or why not
DATA_ASSETS = ("teacher_labels", "curated_examples", "dataset_splits")

# A run cannot mix the unpartitioned export with the prompt-version partitions, so the night is two
# steps: the schedule exports; when that run succeeds, a run status sensor requests one run per
# active prompt version for everything downstream of source_rows.
export_job = dg.define_asset_job("nightly_export", selection=dg.AssetSelection.assets("source_rows"))
refresh_job = dg.define_asset_job(
    "refresh_prompt_version", selection=dg.AssetSelection.assets("source_rows").downstream(include_self=False),
    partitions_def=prompt_versions,
)


def nightly_schedule(nightly: NightlyConfig) -> dg.ScheduleDefinition:
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(nightly.cron):
        raise ConfigError(f"nightly.cron={nightly.cron!r} is not a cron string "
                          "(five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *')")
    return dg.ScheduleDefinition(
        name="nightly", cron_schedule=nightly.cron, job=export_job, execution_timezone=nightly.timezone,
        tags={TRIGGER_TAG: "nightly"},
        description=f"Export new teacher rows ({nightly.cron}, {nightly.timezone}); the sensor refresh_after_export "
                    "then rebuilds the active prompt versions.",
    )


def current_source_version(instance: dg.DagsterInstance) -> str | None:
    """The data version of the latest source_rows export (a digest of the exported files)."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    event = instance.get_latest_materialization_event(dg.AssetKey("source_rows"))
    version = extract_data_version_from_entry(event) if event else None
    return version.value if version else None


def _failed_only_at_a_gate(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether every failed step of the run failed because a blocking check did not pass (a verdict on
    these rows, which rerunning on the same rows would only repeat)."""
    failures = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    errors = [getattr(e.dagster_event.step_failure_data, "error", None) for e in failures]
    return bool(errors) and all(err is not None and err.cls_name == "DagsterAssetCheckFailedError" for err in errors)


def refresh_decision(instance: dg.DagsterInstance, partition: str, source_version: str) -> str | None:
    """None when `partition` must be rebuilt from `source_version`; else why not (one line)."""
    runs = instance.get_runs(filters=dg.RunsFilter(
        tags={"dagster/partition": partition, SOURCE_VERSION_TAG: source_version}), limit=1)
    if not runs:
        return None
    run = runs[0]
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return f"{partition}: already built from these rows (run {run.run_id[:8]})"
    if run.status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
        return f"{partition}: a run on these rows is {run.status.value.lower()} ({run.run_id[:8]})"
    if run.status == dg.DagsterRunStatus.FAILURE and _failed_only_at_a_gate(instance, run.run_id):
        return f"{partition}: its student failed the gate on these rows (run {run.run_id[:8]}); nothing new to train on"
    return None  # failed or cancelled for another reason: try again


def _latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    if not records:
        return None
    return {k: getattr(v, "value", v) for k, v in records[0].asset_materialization.metadata.items()}


def retrain_decision(instance: dg.DagsterInstance, partition: str, min_new_share: float) -> str | None:
    """None when tonight's refresh of `partition` retrains the student; else why not (one line)."""
    exported = _latest_metadata(instance, "source_rows") or {}
    adapter = _latest_metadata(instance, "student_adapter", partition)
    rows_now, rows_then = exported.get("rows_total"), (adapter or {}).get("source_rows_total")
    if adapter is None or rows_now is None or not rows_then:
        return None  # no student yet, or nothing to compare with
    grown = (rows_now - rows_then) / rows_then
    if grown >= min_new_share:
        return None
    return (f"{partition}: the source grew {grown:.2%} since its adapter was trained ({rows_then:,} -> {rows_now:,} "
            f"rows) < nightly.retrain_min_new_rows_share={min_new_share:g}: data stages only")


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[export_job],
                      request_job=refresh_job, name="refresh_after_export")
def refresh_after_export(context: dg.RunStatusSensorContext, settings: SettingsResource):
    """After a successful export, rebuild the active prompt versions that these rows have not built yet."""
    cfg = settings.load()
    try:
        active = active_versions(load_prompts(cfg.prompts_dir), cfg.nightly.active_prompt_versions)
    except PromptError as exc:
        raise ConfigError(str(exc)) from None  # shown as the failed tick of this sensor in the UI
    source_version = current_source_version(context.instance)
    if not active or source_version is None:
        return dg.SkipReason("no prompt version in prompts_dir" if not active else "source_rows has no data version")
    todo, skipped = [], []
    for key in active:
        reason = refresh_decision(context.instance, key, source_version)
        (skipped.append(reason) if reason else todo.append(key))
    for reason in skipped:
        context.log.info(f"not refreshed: {reason}")
    if not todo:
        return dg.SkipReason("; ".join(skipped))
    known = set(context.instance.get_dynamic_partitions(prompt_versions.name))
    trigger = context.dagster_run.tags.get(TRIGGER_TAG, "manual")
    requests = []
    for key in todo:
        wait = retrain_decision(context.instance, key, cfg.nightly.retrain_min_new_rows_share) if key in known else None
        if wait:
            context.log.info(f"not retrained: {wait}")
        requests.append(dg.RunRequest(
            run_key=f"{context.dagster_run.run_id}:{key}", partition_key=key,
            asset_selection=[dg.AssetKey(a) for a in DATA_ASSETS] if wait else None,
            tags={TRIGGER_TAG: trigger, PROMPT_VERSION_TAG: key, SOURCE_VERSION_TAG: source_version,
                  RETRAIN_TAG: "yes" if wait is None else "not yet: source grew too little"}))
    return dg.SensorResult(
        dynamic_partitions_requests=[prompt_versions.build_add_request([k for k in todo if k not in known])],
        run_requests=requests,
    )


def scan_prompt_versions(folder: Path) -> tuple[list[str], list[str]]:
    """(keys of the valid prompt files, one error line per malformed file) -- one bad file blocks no other."""
    keys, errors = [], []
    if not folder.is_dir():
        return keys, [f"prompts folder {folder} does not exist (setting prompts_dir)"]
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in PROMPT_SUFFIXES:
            try:
                keys.append(load_prompt(path).key)
            except PromptError as exc:
                errors.append(str(exc))
    return keys, errors


@dg.sensor(
    name="prompt_versions_sensor", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
    target=dg.AssetSelection.assets("teacher_labels").downstream(),
    description="Registers each new teacher prompt file in prompts_dir as a prompt_version partition and "
                "requests the backfill of teacher_labels and everything downstream for it.",
)
def prompt_versions_sensor(context: dg.SensorEvaluationContext, settings: SettingsResource):
    cfg = settings.load()
    keys, errors = scan_prompt_versions(cfg.prompts_dir)
    for error in errors:
        context.log.error(f"prompt file skipped: {error}")
    known = set(context.instance.get_dynamic_partitions(prompt_versions.name))
    new = [k for k in keys if k not in known]
    if not new:
        return dg.SkipReason(f"no new prompt version in {cfg.prompts_dir} ({len(keys)} known"
                             + (f"; {len(errors)} malformed file(s): {errors}" if errors else "") + ")")
    context.log.info(f"new prompt versions: {new}")
    source_version = current_source_version(context.instance)
    tags = {TRIGGER_TAG: "prompt-version-sensor"} | ({SOURCE_VERSION_TAG: source_version} if source_version else {})
    return dg.SensorResult(
        dynamic_partitions_requests=[prompt_versions.build_add_request(new)],
        run_requests=[dg.RunRequest(run_key=f"prompt-version-{k}", partition_key=k,
                                    tags={**tags, PROMPT_VERSION_TAG: k}) for k in new],
    )


def _failed_checks(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, dict]]:
    out = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data
        if not evaluation.passed:
            figures = {k: getattr(v, "value", v) for k, v in (evaluation.metadata or {}).items()}
            out.append((f"{evaluation.asset_key.to_user_string()}.{evaluation.check_name}", figures))
    return out


@dg.run_failure_sensor(name="alert_on_failure", default_status=dg.DefaultSensorStatus.RUNNING,
                       monitor_all_code_locations=False)
def alert_on_failure(context: dg.RunFailureSensorContext, settings: SettingsResource):
    """A failed run -> <home>/alerts/<time>-<run>.md (what failed, why, how to rerun) and, when the webhook
    variable is set, a post to it. A failed gate is a verdict, not an outage: summarised, not posted."""
    cfg = settings.load()
    run = context.dagster_run
    failures = [(e.step_key or "?", alerts.error_line(e.dagster_event.step_failure_data.error))
                for e in context.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
                if e.dagster_event and e.dagster_event.step_failure_data.error]
    summary = alerts.RunFailure(
        run_id=run.run_id, job=run.job_name, partition=run.tags.get("dagster/partition"),
        trigger=run.tags.get(TRIGGER_TAG, "manual"), run_error=context.failure_event.message or "",
        failed_steps=failures, failed_checks=_failed_checks(context.instance, run.run_id), gate_only=_failed_only_at_a_gate(context.instance, run.run_id))
    path, posted = alerts.deliver(summary, cfg)
    context.log.info(f"failure summary written to {path}" + ("; webhook notified" if posted else ""))
