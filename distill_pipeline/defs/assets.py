"""The assets: each calls its stage (distill_pipeline/stages/<asset>.py), then turns the result into
metadata and check results. No pipeline logic lives here."""

from typing import Any

import dagster as dg

from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import (ComputeResource, MlflowResource, PostgresResource, SettingsResource,
                                             TeacherResource)
from distill_pipeline.stages import checks


def as_metadata(values: dict[str, Any]) -> dict[str, Any]:
    """Plain values as Dagster shows them: paths, links, markdown and JSON where they are such."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key.endswith("_path") or key == "path":
            value = dg.MetadataValue.path(str(value))
        elif key == "mlflow_run":
            value = dg.MetadataValue.url(value)
        elif key == "samples":
            value = dg.MetadataValue.md(value)
        elif isinstance(value, (dict, list, tuple)):
            value = dg.MetadataValue.json(value)
        out[key] = value
    return out


@dg.asset(group_name="data", kinds={"postgres", "parquet"},
          description="The team's table of teacher inferences, exported incrementally to day-bucketed Parquet shards.")
def source_rows(settings: SettingsResource, postgres: PostgresResource) -> dg.MaterializeResult:
    from distill_pipeline.stages.source_rows import build_source_rows

    cfg = settings.load()
    result = build_source_rows(cfg, postgres.database())
    # The data version lets Dagster (and the nightly refresh) tell a night that changed rows from one that did not.
    return dg.MaterializeResult(data_version=dg.DataVersion(result.data_version),
                                metadata=as_metadata({**result.metadata(), "table": cfg.source.table}))


@dg.asset(
    partitions_def=prompt_versions, deps=[source_rows], group_name="teacher", kinds={"postgres", "parquet"},
    description="Every source input labelled under one prompt version: stored outputs of that version reused, "
                "then the Postgres label cache, then the teacher; failures and invalid answers kept with status.",
    check_specs=[dg.AssetCheckSpec("answers_mostly_usable", asset="teacher_labels",
                                   description="failed + invalid + over-budget share <= teacher.max_bad_share")],
)
def teacher_labels(context: dg.AssetExecutionContext, settings: SettingsResource, postgres: PostgresResource,
                   teacher: TeacherResource):
    from distill_pipeline.stages.teacher_labels import build_teacher_labels

    cfg = settings.load()
    with teacher.endpoint(cfg) as endpoint:
        run = build_teacher_labels(cfg, context.partition_key, postgres.database(), endpoint, logger=context.log)
    yield dg.MaterializeResult(metadata=as_metadata({**run.metadata(), "teacher_endpoint": endpoint.description}))
    passed, share = checks.answers_mostly_usable(run.counts, run.rows, cfg.teacher.max_bad_share)
    yield dg.AssetCheckResult(check_name="answers_mostly_usable", passed=passed, severity=dg.AssetCheckSeverity.WARN,
                              metadata={"bad_share": share, "max_bad_share": cfg.teacher.max_bad_share})


@dg.asset(
    partitions_def=prompt_versions, deps=[teacher_labels], group_name="data", kinds={"parquet"},
    description="Validated, filtered, deduplicated examples; every dropped row quarantined with its reason.",
    check_specs=[dg.AssetCheckSpec("targets_match_task_schema", asset="curated_examples", blocking=True),
                 dg.AssetCheckSpec("has_examples", asset="curated_examples", blocking=True)],
)
def curated_examples(context: dg.AssetExecutionContext, settings: SettingsResource):
    from distill_pipeline.stages.curated_examples import build_curated_examples

    cfg = settings.load()
    result, manifest = build_curated_examples(cfg, context.partition_key)
    yield dg.MaterializeResult(metadata=as_metadata({
        **result.counts, "duplicate_rate": manifest["duplicate_rate"], "labels": manifest["labels"],
        # full, or incremental: how many rows were new or changed and how many had to be judged again
        **{k: v for k, v in manifest.items() if k == "mode" or k.startswith(("rows_", "chains_", "clusters_"))},
        "duration_s": round(result.seconds, 3), "examples_path": manifest["examples_path"],
        "quarantine_path": manifest["quarantine_path"]}))
    checked, bad, shown = checks.targets_violating_schema(cfg.task, manifest["examples_path"])
    yield dg.AssetCheckResult(check_name="targets_match_task_schema", passed=bad == 0,
                              metadata=as_metadata({"checked": checked, "violations": bad, "examples": shown}))
    yield dg.AssetCheckResult(check_name="has_examples", passed=checked > 0, metadata={"kept": checked})


@dg.asset(
    partitions_def=prompt_versions, deps=[curated_examples], group_name="data", kinds={"parquet"},
    description="Sticky, stratified, leakage-free train/val/test (Parquet and a datasets.DatasetDict).",
    check_specs=[dg.AssetCheckSpec("no_leakage_between_splits", asset="dataset_splits", blocking=True),
                 dg.AssetCheckSpec("no_empty_split", asset="dataset_splits", blocking=True),
                 dg.AssetCheckSpec("label_shares_match_whole", asset="dataset_splits"),
                 dg.AssetCheckSpec("field_shares_match_whole", asset="dataset_splits")],
)
def dataset_splits(context: dg.AssetExecutionContext, settings: SettingsResource):
    from distill_pipeline.stages.dataset_splits import build_dataset_splits, read_splits

    cfg = settings.load()
    manifest = build_dataset_splits(cfg, context.partition_key)
    splits = manifest["splits"]
    yield dg.MaterializeResult(metadata=as_metadata({
        **{f"{name}_rows": info["rows"] for name, info in splits.items()},
        **{f"{name}_sha256": info["sha256"][:16] for name, info in splits.items()},
        "label_shares": manifest["label_shares"], "clusters_merged_for_leakage": manifest["clusters_merged_for_leakage"],
        "mode": manifest["mode"], "pairs_checked": manifest.get("pairs_checked"),
        "path": cfg.stage_dir("dataset_splits", context.partition_key)}))
    parts = read_splits(cfg.stage_dir("dataset_splits", context.partition_key))
    leak_ok, leak = checks.check_leakage(parts, cfg.curate.near_duplicate_threshold, cfg.curate.shingle_size,
                                         memory=cfg.stage_dir("dataset_splits", context.partition_key)
                                         / "checks" / "leakage_passed.json")
    yield dg.AssetCheckResult(check_name="no_leakage_between_splits", passed=leak_ok, metadata=as_metadata(leak))
    empty = [name for name, part in parts.items() if part.num_rows == 0]
    yield dg.AssetCheckResult(check_name="no_empty_split", passed=not empty, metadata=as_metadata({"empty": empty}))
    balance_ok, balance = checks.check_label_balance(parts, cfg.split.max_label_share_gap)
    yield dg.AssetCheckResult(check_name="label_shares_match_whole", passed=balance_ok,
                              severity=dg.AssetCheckSeverity.WARN, metadata=as_metadata(balance))
    fields_ok, fields = checks.check_field_balance(parts, cfg.task, cfg.split.max_label_share_gap)
    yield dg.AssetCheckResult(check_name="field_shares_match_whole", passed=fields_ok,
                              severity=dg.AssetCheckSeverity.WARN, metadata=as_metadata(fields))


@dg.asset(
    partitions_def=prompt_versions, deps=[dataset_splits], group_name="training", kinds={"pytorch", "mlflow"},
    pool="gpu",
    description="LoRA adapter of the student on this prompt version's splits, trained in its own process "
                "(local or a Kubernetes GPU pod); one MLflow run per materialization.",
)
def student_adapter(context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource,
                    mlflow: MlflowResource) -> dg.MaterializeResult:
    from distill_pipeline.stages.source_rows import read_manifest
    from distill_pipeline.stages.student_adapter import build_student_adapter

    cfg, experiments = settings.load(), mlflow.store()
    exported = read_manifest(cfg.stage_dir("source_rows")) or {}
    result = build_student_adapter(
        cfg, context.partition_key, config_file=settings.path(), experiments=experiments,
        compute=compute.bound(context, tracking_uri=experiments.tracking_uri), logger=context.log,
        run_tags={"dagster.run_id": context.run_id, "dagster.asset_key": context.asset_key.to_user_string(),
                  "dagster.partition": context.partition_key})
    return dg.MaterializeResult(
        metadata=as_metadata({
            **{k: v for k, v in result.worker.items() if k != "adapter_path"},
            "reused": result.reused, "mlflow_run_id": result.mlflow_run_id, "mlflow_run": result.mlflow_run,
            "adapter_path": result.adapter_dir, "adapter_sha256": result.adapter_sha256,
            "train_sha256": result.data["train"]["sha256"][:16], "val_sha256": result.data["val"]["sha256"][:16],
            "compute": result.compute,
            # the nightly refresh retrains once the source has grown enough past this (nightly.retrain_min_new_rows_share)
            "source_rows_total": exported.get("rows")}),
        data_version=dg.DataVersion(result.adapter_sha256[:16]))


@dg.asset(
    partitions_def=prompt_versions, deps=[student_adapter], group_name="evaluation", kinds={"pytorch", "mlflow"},
    pool="gpu",
    description="The student against the teacher on the test split: task metrics (constrained and not), latency, "
                "tokens and cost of both, an HTML report; the gate registers a passing adapter in MLflow.",
    check_specs=[dg.AssetCheckSpec("student_meets_the_bar", asset="eval_report", blocking=True,
                                   description="headline metric >= eval.min_headline and no worse than the champion")],
)
def eval_report(context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource,
                mlflow: MlflowResource):
    from distill_pipeline.stages.eval_report import build_eval_report

    cfg, store = settings.load(), mlflow.store()
    result = build_eval_report(cfg, context.partition_key, config_file=settings.path(), registry=mlflow.registry(),
                               compute=compute.bound(context, tracking_uri=store.tracking_uri), logger=context.log)
    report, gate = result.report, result.gate
    yield dg.MaterializeResult(metadata=as_metadata({
        "headline_metric": gate.headline_metric, "headline_value": gate.headline_value, "gate_passed": gate.passed,
        "unconstrained_headline": (report["unconstrained"] or {}).get("headline_value"),
        "valid_json_rate": (report["metrics"].get("validity") or {}).get("valid_json_rate"),
        "report_path": result.html_path, "report_json_path": result.json_path, "failures": result.failures,
        "failures_path": result.failures_path, "rows": report["rows"],
        "latency_and_cost": report["latency_and_cost"], "loss_gap": report["training"]["loss_gap"],
        "mlflow_run_id": result.mlflow_run_id, "registered_version": result.registered_version,
        "champion": result.champion}))
    yield dg.AssetCheckResult(check_name="student_meets_the_bar", passed=gate.passed, metadata=as_metadata({
        "headline_metric": gate.headline_metric, "headline_value": gate.headline_value, "threshold": gate.threshold,
        "champion_value": gate.champion_value, "reasons": gate.reasons or ["meets the bar"]}))


@dg.asset(
    partitions_def=prompt_versions, deps=[eval_report], group_name="deployment", kinds={"gguf", "mlflow"},
    pool="gpu",
    description="The evaluated student merged into its base and written as GGUF (llama.cpp, Ollama, LM Studio), "
                "with a Modelfile, its schema and a README; checked against the merged model through llama.cpp.",
    check_specs=[dg.AssetCheckSpec("answers_like_the_evaluated_model", asset="gguf_model", blocking=True,
                                   description="tokenization identical, greedy answers equal (or within the "
                                               "quantization tolerances), task metric within gguf.max_metric_drop")],
)
def gguf_model(context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource,
               mlflow: MlflowResource):
    from distill_pipeline.stages.gguf_model import build_gguf_model

    cfg, store = settings.load(), mlflow.store()
    result = build_gguf_model(cfg, context.partition_key, config_file=settings.path(), registry=mlflow.registry(),
                              compute=compute.bound(context, tracking_uri=store.tracking_uri), logger=context.log)
    yield dg.MaterializeResult(metadata=as_metadata({
        "gguf_path": result.gguf_path, "size_mb": round(result.size_bytes / 1e6, 1), "type": result.out_type,
        "sha256": result.sha256, "parity_passed": result.passed, "parity": result.parity, "task_metric": result.metric,
        "export_s": result.extra.get("export_s"), "manifest_path": result.manifest_path,
        "registered_version": result.registered_version}),
        data_version=dg.DataVersion(result.sha256[:16]))
    yield dg.AssetCheckResult(check_name="answers_like_the_evaluated_model", passed=result.passed,
                              metadata=as_metadata({"reasons": result.reasons or ["parity holds"],
                                                    "task_metric": result.metric}))
