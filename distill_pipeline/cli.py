"""`distill ...`: the pipeline without the UI.

    distill demo [--rows N]             seed the demo table and materialize the whole graph
    distill materialize [--partition K] [ASSET ...]
                                        materialize assets through Dagster (runs show in the UI)
    distill seed-demo [--rows N]        create/fill the demo table only
    distill prompts                     list teacher prompt versions and their partition keys
    distill check-config                validate the config and print it (secrets masked)
    distill export | curate K | split K run one data stage directly, without Dagster

Every command reads the config from --config, else $DISTILL_CONFIG, else the demo config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from distill_pipeline.config import ConfigError, PipelineConfig, load_config

PARTITIONED_ORDER = ["teacher_labels", "curated_examples", "dataset_splits", "student_adapter", "eval_report",
                     "gguf_model"]


def dagster_instance(cfg: PipelineConfig):
    """The persistent Dagster instance under <home>/dagster, shared with `make dev`."""
    import dagster as dg

    home = (cfg.home / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DAGSTER_HOME", str(home))
    template = Path.cwd() / "dagster.yaml"
    target = Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml"
    if template.exists() and not target.exists():
        shutil.copy(template, target)
    return dg.DagsterInstance.get()


def register_prompt_versions(cfg: PipelineConfig, instance) -> list[str]:
    from distill_pipeline.defs.partitions import prompt_versions
    from distill_pipeline.stages.prompts import load_prompts

    keys = sorted(load_prompts(cfg.prompts_dir))
    existing = set(instance.get_dynamic_partitions(prompt_versions.name))
    missing = [k for k in keys if k not in existing]
    if missing:
        instance.add_dynamic_partitions(prompt_versions.name, missing)
    return keys


def materialize(select: list[str], partition: str | None, instance, config_file: str | None = None) -> None:
    import dagster as dg

    from distill_pipeline.definitions import defs

    available = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    chosen = [name for name in select if name in available]
    if not chosen:
        return
    resources = dict(defs.resources or {})
    if config_file:
        from distill_pipeline.defs.resources import PostgresResource, SettingsResource

        settings = SettingsResource(config_file=config_file)
        resources.update(settings=settings, postgres=PostgresResource(settings=settings))
    assets = list(defs.assets or []) + list(defs.asset_checks or [])
    print(f"materializing {', '.join(chosen)}" + (f" [{partition}]" if partition else ""), flush=True)
    result = dg.materialize(assets, selection=chosen, partition_key=partition, instance=instance,
                            resources=resources, raise_on_error=False)
    if not result.success:
        raise SystemExit(f"materialization of {chosen} failed; see the run in the Dagster UI (make dev)")


def cmd_demo(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.demo.seed import seed_demo_table

    db = Database.from_config(cfg)
    inserted = seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=args.rows, seed=args.seed)
    print(f"demo table {cfg.source.table}: {inserted} new rows (Postgres at {db.safe_url})")
    instance = dagster_instance(cfg)
    keys = register_prompt_versions(cfg, instance)
    materialize(["source_rows"], None, instance, args.config)
    chain = PARTITIONED_ORDER
    if args.stop_after:
        chain = PARTITIONED_ORDER[: PARTITIONED_ORDER.index(args.stop_after) + 1]
    for key in keys:
        materialize(chain, key, instance, args.config)
    print("\nOutputs:")
    for stage in ["source_rows"] + PARTITIONED_ORDER:
        path = cfg.stage_dir(stage)
        if path.exists():
            print(f"  {stage:18s} {path.resolve()}")
    print(f"  {'dagster runs':18s} {os.environ['DAGSTER_HOME']}   (open them with: make dev)")


def cmd_materialize(args, cfg: PipelineConfig) -> None:
    instance = dagster_instance(cfg)
    register_prompt_versions(cfg, instance)
    select = args.assets or (["source_rows"] if args.partition is None else PARTITIONED_ORDER)
    materialize(select, args.partition, instance, args.config)


def cmd_seed(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.demo.seed import seed_demo_table

    n = seed_demo_table(Database.from_config(cfg), cfg.source.table, cfg.prompts_dir, rows=args.rows, seed=args.seed)
    print(f"{n} new rows in {cfg.source.table}")


def cmd_prompts(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.stages.prompts import load_prompts

    for key, version in sorted(load_prompts(cfg.prompts_dir).items()):
        print(f"{key}\t{version.path}")


def cmd_check_config(args, cfg: PipelineConfig) -> None:
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))  # SecretStr dumps as '**********'


def cmd_export(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.stages.export import export_source_rows, result_dict

    result = export_source_rows(Database.from_config(cfg), cfg.source, cfg.stage_dir("source_rows"))
    print(json.dumps(result_dict(result), indent=2, default=str))


def cmd_curate(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.stages.curate import curate_table, write_curated
    from distill_pipeline.stages.labels import read_labels

    result = curate_table(read_labels(cfg, args.prompt_version), cfg)
    print(json.dumps(write_curated(result, cfg.stage_dir("curated_examples", args.prompt_version),
                                   args.prompt_version), indent=2))


def cmd_split(args, cfg: PipelineConfig) -> None:
    import pyarrow.parquet as pq

    from distill_pipeline.stages.curate import EXAMPLES
    from distill_pipeline.stages.split import write_splits

    examples = pq.read_table(cfg.stage_dir("curated_examples", args.prompt_version) / EXAMPLES)
    manifest = write_splits(examples, cfg.split, cfg.stage_dir("dataset_splits", args.prompt_version),
                            args.prompt_version, curate=cfg.curate)
    print(json.dumps(manifest, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: $DISTILL_CONFIG or the demo config)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="seed the demo table and materialize the whole graph")
    demo.add_argument("--rows", type=int, default=5000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--stop-after", choices=PARTITIONED_ORDER, help="materialize the graph only up to this asset")
    demo.set_defaults(func=cmd_demo)
    mat = sub.add_parser("materialize", help="materialize assets through Dagster")
    mat.add_argument("assets", nargs="*")
    mat.add_argument("--partition", help="prompt version key (see `distill prompts`)")
    mat.set_defaults(func=cmd_materialize)
    seed = sub.add_parser("seed-demo", help="create and fill the demo table")
    seed.add_argument("--rows", type=int, default=5000)
    seed.add_argument("--seed", type=int, default=7)
    seed.set_defaults(func=cmd_seed)
    sub.add_parser("prompts", help="list prompt versions").set_defaults(func=cmd_prompts)
    sub.add_parser("check-config", help="validate and print the config").set_defaults(func=cmd_check_config)
    sub.add_parser("export", help="run source_rows without Dagster").set_defaults(func=cmd_export)
    for name, func in (("curate", cmd_curate), ("split", cmd_split)):
        p = sub.add_parser(name, help=f"run the {name} stage without Dagster")
        p.add_argument("prompt_version")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        sys.exit(f"distill: {exc}")
    args.func(args, cfg)


if __name__ == "__main__":
    main()
