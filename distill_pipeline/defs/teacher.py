"""Teacher labelling in Dagster: the `teacher_labels` asset, the prompt-version sensor, the API key resource.

The sensor watches `prompts_dir`: each new prompt file (or edit, which makes a new key) becomes a
partition of `prompt_version`, and one run per new partition is requested for `teacher_labels` and
everything downstream of it, i.e. the backfill of that version. Old partitions stay as they are.
"""

import os

import dagster as dg

from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import PostgresResource, SettingsResource
from distill_pipeline.stages import labels
from distill_pipeline.stages.prompts import PROMPT_SUFFIXES, PromptError, load_prompt


class TeacherResource(dg.ConfigurableResource):
    """The teacher API key. Pass it as `dg.EnvVar(...)` so Dagster keeps the variable's name, never the key.

    Unset -> the environment variable named by the config's teacher.api_key_env is read at run time
    (none at all is fine for the demo teacher).
    """

    api_key: str | None = None

    @classmethod
    def from_env(cls, name: str = "DISTILL_TEACHER_API_KEY"):
        # dg.EnvVar of an unset variable fails at launch, so only bind it when it is set.
        return cls(api_key=dg.EnvVar(name)) if os.environ.get(name) else cls()

    def key_for(self, cfg) -> str | None:
        return self.api_key or os.environ.get(cfg.teacher.api_key_env) or None


@dg.asset(
    partitions_def=prompt_versions,
    deps=[dg.AssetKey("source_rows")],
    group_name="teacher",
    kinds={"postgres", "parquet"},
    description="Every source input labelled under one prompt version: stored outputs of that version reused, "
                "then the Postgres label cache, then the teacher; failures and invalid answers kept with status.",
    check_specs=[dg.AssetCheckSpec("answers_mostly_usable", asset="teacher_labels",
                                   description="failed + invalid + over-budget share <= teacher.max_bad_share")],
)
def teacher_labels(context: dg.AssetExecutionContext, settings: SettingsResource, postgres: PostgresResource,
                   teacher: TeacherResource):
    from distill_pipeline.demo.teacher_server import serving_demo_teacher
    from distill_pipeline.stages.export import read_source_rows
    from distill_pipeline.stages.prompts import load_prompts

    cfg = settings.load()
    pv = context.partition_key
    prompts = load_prompts(cfg.prompts_dir)
    if pv not in prompts:
        raise dg.Failure(f"prompt version {pv} has no file in {cfg.prompts_dir} any more (edited or removed); "
                         f"current versions: {sorted(prompts)}")
    rows = read_source_rows(cfg)
    with serving_demo_teacher(cfg) as run_cfg:
        run = labels.label_partition(run_cfg, prompts[pv], rows, postgres.database(),
                                     api_key=teacher.key_for(cfg), logger=context.log)
    meta = run.metadata()
    meta["path"] = dg.MetadataValue.path(meta["path"])
    meta["teacher_endpoint"] = "demo teacher (in-run)" if cfg.teacher.demo_server else cfg.teacher.base_url
    meta["teacher_model"] = cfg.teacher.model or prompts[pv].teacher.model
    if run.budget_reached:
        meta["budget_note"] = (f"budget teacher.budget_usd=${cfg.teacher.budget_usd:g} reached: {run.not_sent} "
                               "inputs not sent (status over_budget); re-run with a larger budget to finish")
    yield dg.MaterializeResult(metadata=meta)

    answered = run.rows - run.counts["invalid_input"]
    bad = run.counts["failed"] + run.counts["invalid"] + run.counts["over_budget"]
    share = bad / answered if answered else 0.0
    yield dg.AssetCheckResult(
        check_name="answers_mostly_usable", passed=share <= cfg.teacher.max_bad_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"bad_share": round(share, 4), "failed": run.counts["failed"], "invalid": run.counts["invalid"],
                  "over_budget": run.counts["over_budget"], "max_bad_share": cfg.teacher.max_bad_share})


def scan_prompt_versions(folder) -> tuple[list[str], list[str]]:
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
    name="prompt_versions_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
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


defs = dg.Definitions(assets=[teacher_labels], sensors=[prompt_versions_sensor])
