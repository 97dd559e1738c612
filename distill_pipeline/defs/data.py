"""The data half of the graph: source_rows, then (after teacher_labels) curated_examples -> dataset_splits.

Assets only wire stages to resources and record metadata; checks are computed by
stage functions and reported as (blocking) asset checks of the same run.
"""


import pyarrow.parquet as pq

import dagster as dg

from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import PostgresResource, SettingsResource
from distill_pipeline.stages import curate, export, labels, split
from distill_pipeline.stages.tasks import parse_output


@dg.asset(
    group_name="data",
    kinds={"postgres", "parquet"},
    description="The team's table of teacher inferences, exported incrementally to day-bucketed Parquet shards.",
)
def source_rows(settings: SettingsResource, postgres: PostgresResource) -> dg.MaterializeResult:
    cfg = settings.load()
    result = export.export_source_rows(postgres.database(), cfg.source, cfg.stage_dir("source_rows"))
    return dg.MaterializeResult(metadata={
        "rows_read": result.rows_read,
        "rows_total": result.rows_total,
        "bytes_total": result.bytes_total,
        "shards": result.shards,
        "days_rewritten": len(result.days_rewritten),
        "watermark": dg.MetadataValue.json(result.watermark or {}),
        "reread_from": result.since or "start",
        "duration_s": round(result.seconds, 3),
        "rows_per_s": round(result.rows_per_s),
        "table": cfg.source.table,
        "manifest": dg.MetadataValue.path(result.manifest_path),
    })


@dg.asset(
    group_name="data",
    kinds={"parquet"},
    partitions_def=prompt_versions,
    deps=[dg.AssetKey("teacher_labels")],
    description="Validated, filtered, deduplicated examples; every dropped row quarantined with its reason.",
    check_specs=[
        dg.AssetCheckSpec("targets_match_task_schema", asset="curated_examples", blocking=True),
        dg.AssetCheckSpec("has_examples", asset="curated_examples", blocking=True),
    ],
)
def curated_examples(context: dg.AssetExecutionContext, settings: SettingsResource):
    cfg = settings.load()
    pv = context.partition_key
    result = curate.curate_table(labels.read_labels(cfg, pv), cfg)
    manifest = curate.write_curated(result, cfg.stage_dir("curated_examples", pv), pv)
    bad = [t for t in result.examples.column("target").to_pylist() if not parse_output(cfg.task, t).ok]
    yield dg.MaterializeResult(metadata={
        **{k: int(v) for k, v in result.counts.items()},
        "duplicate_rate": manifest["duplicate_rate"],
        "labels": dg.MetadataValue.json(manifest["labels"]),
        "duration_s": round(result.seconds, 3),
        "examples": dg.MetadataValue.path(manifest["examples_path"]),
        "quarantine": dg.MetadataValue.path(manifest["quarantine_path"]),
    })
    yield dg.AssetCheckResult(check_name="targets_match_task_schema", passed=not bad,
                              metadata={"invalid_targets": len(bad)})
    yield dg.AssetCheckResult(check_name="has_examples", passed=result.examples.num_rows > 0,
                              metadata={"kept": result.examples.num_rows})


@dg.asset(
    group_name="data",
    kinds={"parquet"},
    partitions_def=prompt_versions,
    deps=[curated_examples],
    description="Sticky, stratified, leakage-free train/val/test (Parquet and a datasets.DatasetDict).",
    check_specs=[
        dg.AssetCheckSpec("no_leakage_between_splits", asset="dataset_splits", blocking=True),
        dg.AssetCheckSpec("no_empty_split", asset="dataset_splits", blocking=True),
        dg.AssetCheckSpec("label_shares_match_whole", asset="dataset_splits"),
    ],
)
def dataset_splits(context: dg.AssetExecutionContext, settings: SettingsResource):
    cfg = settings.load()
    pv = context.partition_key
    examples = pq.read_table(cfg.stage_dir("curated_examples", pv) / curate.EXAMPLES)
    out_dir = cfg.stage_dir("dataset_splits", pv)
    manifest = split.write_splits(examples, cfg.split, out_dir, pv, curate=cfg.curate)
    parts = split.read_splits(out_dir)
    yield dg.MaterializeResult(metadata={
        **{f"{name}_rows": info["rows"] for name, info in manifest["splits"].items()},
        **{f"{name}_sha256": info["sha256"][:16] for name, info in manifest["splits"].items()},
        "label_shares": dg.MetadataValue.json(manifest["label_shares"]),
        "clusters_merged_for_leakage": manifest["clusters_merged_for_leakage"],
        "path": dg.MetadataValue.path(str(out_dir)),
    })
    leak_ok, leak = split.check_leakage(parts, cfg.curate)
    yield dg.AssetCheckResult(check_name="no_leakage_between_splits", passed=leak_ok,
                              metadata={k: dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v
                                        for k, v in leak.items()})
    empty = [name for name, part in parts.items() if part.num_rows == 0]
    yield dg.AssetCheckResult(check_name="no_empty_split", passed=not empty,
                              metadata={"empty_splits": dg.MetadataValue.json(empty)})
    balance_ok, balance = split.check_label_balance(parts, cfg.split.max_label_share_gap)
    yield dg.AssetCheckResult(check_name="label_shares_match_whole", passed=balance_ok,
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"worst_gap_per_split": dg.MetadataValue.json(balance["worst_gap_per_split"]),
                                        "max_gap": balance["max_gap"]})


defs = dg.Definitions(assets=[source_rows, curated_examples, dataset_splits])
