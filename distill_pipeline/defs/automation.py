"""What starts runs: the prompt-version sensor (a new prompt file -> a partition and its backfill) and the
nightly rebuild (export, then every prompt version's chain)."""

from pathlib import Path

import dagster as dg

from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import SettingsResource
from distill_pipeline.stages.prompts import PROMPT_SUFFIXES, PromptError, load_prompt

# A run cannot mix the unpartitioned export with the prompt-version partitions, so the night is two
# steps: the schedule exports; when that run succeeds, a run status sensor requests one run per
# registered prompt version for everything downstream of source_rows.
export_job = dg.define_asset_job("nightly_export", selection=dg.AssetSelection.assets("source_rows"))
refresh_job = dg.define_asset_job(
    "refresh_prompt_version", selection=dg.AssetSelection.assets("source_rows").downstream(include_self=False),
    partitions_def=prompt_versions,
)
nightly_schedule = dg.ScheduleDefinition(
    name="nightly", cron_schedule="0 2 * * *", job=export_job, execution_timezone="UTC",
    description="Export new teacher rows every night at 02:00 UTC; the refresh sensor takes it from there.",
)


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[export_job],
                      request_job=refresh_job, name="refresh_after_export")
def refresh_after_export(context: dg.RunStatusSensorContext):
    """After a successful export, rebuild every prompt version from the new rows."""
    keys = context.instance.get_dynamic_partitions(prompt_versions.name)
    if not keys:
        return dg.SkipReason("no prompt versions registered yet")
    run_id = context.dagster_run.run_id
    return [dg.RunRequest(run_key=f"{run_id}:{key}", partition_key=key) for key in sorted(keys)]


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
    return dg.SensorResult(
        dynamic_partitions_requests=[prompt_versions.build_add_request(new)],
        run_requests=[dg.RunRequest(run_key=f"prompt-version-{k}", partition_key=k,
                                    tags={"distill/prompt_version": k}) for k in new],
    )
