"""The nightly rebuild: export new rows, then refresh every prompt version's chain.

A run cannot mix the unpartitioned export with the prompt-version partitions, so
the night is two steps: the schedule exports; when that run succeeds, a run
status sensor requests one run per registered prompt version for everything
downstream of source_rows.
"""


import dagster as dg

from distill_pipeline.defs.partitions import prompt_versions

export_job = dg.define_asset_job("nightly_export", selection=dg.AssetSelection.assets("source_rows"))

refresh_job = dg.define_asset_job(
    "refresh_prompt_version",
    selection=dg.AssetSelection.assets("source_rows").downstream(include_self=False),
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


defs = dg.Definitions(jobs=[export_job, refresh_job], schedules=[nightly_schedule], sensors=[refresh_after_export])
