"""What a night costs: the data half after 1% new rows ÷ the same stages on a fresh home, on the same table.

    .venv/bin/python bench/nightly.py [--rows 200000] [--new-share 0.01] [--database-url URL]

Seeds N demo rows; run A ("full"): a fresh home runs source_rows, teacher_labels, curated_examples and
dataset_splits for the newest prompt version through the stage entry points the assets call; then 1% new rows
(created now, after the watermark) arrive; run B ("incremental"): the same home runs the same stages again.
Run C: a night without new rows, where the refresh sensor skips the prompt version after the export
(measured: the export, and the sensor's decision, which must be "skip").

Per stage and in total: `full_s`, `incremental_s`, and `ratio_incremental_vs_full` (target <= 0.05).

    .venv/bin/python bench/nightly.py --chain [--rows 20000]

The whole chain, through Dagster as the daemon runs it (demo config: the SmolLM2 student, 112 training steps):
night A materializes source_rows and all six prompt-version assets on a fresh home; then 1% new rows; night B
exports and runs what the refresh sensor's policy asks for (nightly.retrain_min_new_rows_share: at 1% the data
stages only); night B' is the same night under a retrain-every-night policy (the student half again).
Prints `ratio_chain_incremental_vs_full` (B / A), `ratio_chain_forced_retrain_vs_full` ((B + B') / A), and the
data stages' ratio from the same runs' step durations (a step includes its asset checks). `--dagster-data`: the
same nights for the data stages only, through Dagster with their checks.

Without --database-url (or BENCH_DATABASE_URL) an embedded pgserver is used. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_database import own_database  # noqa: E402
from distill_pipeline.clients.postgres import Database, quote_table  # noqa: E402
from distill_pipeline.clients.teacher import DemoTeacher  # noqa: E402
from distill_pipeline.config import load_config  # noqa: E402
from distill_pipeline.demo.seed import seed_demo_table  # noqa: E402
from distill_pipeline.stages.curated_examples import build_curated_examples  # noqa: E402
from distill_pipeline.stages.dataset_splits import build_dataset_splits  # noqa: E402
from distill_pipeline.stages.prompts import active_versions, load_prompts  # noqa: E402
from distill_pipeline.stages.source_rows import build_source_rows  # noqa: E402
from distill_pipeline.stages.teacher_labels import build_teacher_labels  # noqa: E402

STAGES = ["source_rows", "teacher_labels", "curated_examples", "dataset_splits"]


def data_half(cfg, db: Database, version: str) -> tuple[dict[str, float], str, dict]:
    """Seconds per stage, the export's data version, and how curation and splits ran (full or incremental)."""
    seconds = {}
    started = time.perf_counter()
    exported = build_source_rows(cfg, db)
    seconds["source_rows"] = time.perf_counter() - started
    with DemoTeacher().open(cfg.teacher) as endpoint:
        started = time.perf_counter()
        build_teacher_labels(cfg, version, db, endpoint)
        seconds["teacher_labels"] = time.perf_counter() - started
    started = time.perf_counter()
    _, curated = build_curated_examples(cfg, version)
    seconds["curated_examples"] = time.perf_counter() - started
    started = time.perf_counter()
    splits = build_dataset_splits(cfg, version)
    seconds["dataset_splits"] = time.perf_counter() - started
    facts = {"curated_examples": {k: v for k, v in curated.items() if k == "mode" or k.startswith(("rows_", "chains_",
                                                                                                   "clusters_"))},
             "dataset_splits": {k: splits[k] for k in ("mode", "pairs_checked") if k in splits}}
    return seconds, exported.data_version, facts


def add_new_rows(db: Database, table: str, prompts_dir: Path, n: int, first_id: int) -> None:
    """n rows of new content, created now (a night's worth of new teacher outputs)."""
    seed_demo_table(db, table, prompts_dir, rows=n, seed=first_id, first_id=first_id)
    with db.connect() as conn:
        conn.execute(f"UPDATE {quote_table(table)} SET created_at = now() WHERE id >= {first_id}")
        conn.commit()


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Seconds per step of a run, from its event log."""
    import dagster as dg

    started, seconds = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[entry.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            seconds[entry.step_key] = entry.timestamp - started[entry.step_key]
    return seconds


def chain_bench(args, cfg, db: Database, version: str) -> None:
    import dagster as dg

    from distill_pipeline.cli import asset_chain, dagster_instance
    from distill_pipeline.defs import automation
    from distill_pipeline.definitions import build_defs
    from distill_pipeline.defs.partitions import prompt_versions

    defs = build_defs(str(REPO / "distill_pipeline" / "demo" / "demo.yaml"))
    instance = dagster_instance(cfg)
    instance.add_dynamic_partitions(prompt_versions.name, [version])
    _, chain = asset_chain(defs)
    if args.dagster_data:
        chain = list(automation.DATA_ASSETS)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

    def run(selection, partition=None) -> tuple[float, dict[str, float]]:
        started = time.perf_counter()
        result = dg.materialize(list(defs.assets) + list(defs.asset_checks or []), selection=selection,
                                partition_key=partition, instance=instance, resources=dict(defs.resources),
                                run_config=quiet, raise_on_error=False)
        wall = time.perf_counter() - started
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        # a student short of the bar fails its blocking gate: the run's cost is what we measure
        if failed and failed != ["eval_report"]:
            raise SystemExit(f"{selection} [{partition}] failed at {failed}")
        return wall, step_seconds(instance, result.run_id)

    def night(selection) -> tuple[float, dict[str, float]]:
        export_s, export_steps = run(["source_rows"])
        rest_s, rest_steps = run(selection, version) if selection else (0.0, {})
        return export_s + rest_s, {**export_steps, **rest_steps}

    full_s, full_steps = night(chain)
    print(f"night A (full chain): {full_s:.1f} s {json.dumps({k: round(v, 1) for k, v in full_steps.items()})}",
          file=sys.stderr)
    new_rows = max(1, int(args.rows * args.new_share))
    add_new_rows(db, cfg.source.table, cfg.prompts_dir, new_rows, first_id=args.rows + 1)
    export_s, export_steps = run(["source_rows"])
    wait = automation.retrain_decision(instance, version, cfg.nightly.retrain_min_new_rows_share)
    selection = list(automation.DATA_ASSETS) if wait else chain
    rest_s, rest_steps = run(selection, version)
    incr_s, incr_steps = export_s + rest_s, {**export_steps, **rest_steps}
    print(f"night B ({wait or 'retrain'}): {incr_s:.1f} s", file=sys.stderr)
    student = [a for a in chain if a not in automation.DATA_ASSETS]
    forced_s, forced_steps = run(student, version) if wait and student else (0.0, {})
    print(f"night B' (student half again): {forced_s:.1f} s", file=sys.stderr)

    data = ["source_rows", *automation.DATA_ASSETS]
    data_full, data_incr = sum(full_steps[k] for k in data), sum(incr_steps[k] for k in data)
    print(json.dumps({
        "rows": args.rows, "new_rows": new_rows, "retrain_decision": wait or "retrain",
        "full_chain_s": round(full_s, 1), "incremental_chain_s": round(incr_s, 1),
        "forced_retrain_s": round(forced_s, 1),
        "steps_full_s": {k: round(v, 2) for k, v in full_steps.items()},
        "steps_incremental_s": {k: round(v, 2) for k, v in incr_steps.items()},
        "steps_forced_retrain_s": {k: round(v, 2) for k, v in forced_steps.items()},
        "ratio_incremental_vs_full": round(data_incr / data_full, 4),
        "ratio_chain_incremental_vs_full": round(incr_s / full_s, 4),
        "ratio_chain_forced_retrain_vs_full": round((incr_s + forced_s) / full_s, 4),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--new-share", type=float, default=0.01)
    ap.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    ap.add_argument("--chain", action="store_true", help="the whole chain with training, through Dagster")
    ap.add_argument("--dagster-data", action="store_true",
                    help="the data stages through Dagster, their asset checks included (no training)")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    url = own_database(args.database_url, workdir, "bench_nightly")
    os.environ["DISTILL_HOME"] = str(workdir / "home")
    os.environ["DATABASE_URL"] = url
    cfg = load_config()
    db = Database(url)
    seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=args.rows, seed=3)
    version = active_versions(load_prompts(cfg.prompts_dir), cfg.nightly.active_prompt_versions)[0]
    print(f"{args.rows:,} rows; prompt version {version}", file=sys.stderr)
    if args.chain or args.dagster_data:
        return chain_bench(args, cfg, db, version)

    full, version_a, _ = data_half(cfg, db, version)
    print(f"full:        {json.dumps({k: round(v, 2) for k, v in full.items()})}", file=sys.stderr)
    new_rows = max(1, int(args.rows * args.new_share))
    add_new_rows(db, cfg.source.table, cfg.prompts_dir, new_rows, first_id=args.rows + 1)
    incremental, version_b, facts = data_half(cfg, db, version)
    print(f"incremental: {json.dumps({k: round(v, 2) for k, v in incremental.items()})}", file=sys.stderr)

    # A night without new rows: the export runs, its data version is unchanged, the refresh is skipped.
    started = time.perf_counter()
    version_c = build_source_rows(cfg, db).data_version
    quiet_night_s = time.perf_counter() - started

    total_full, total_incr = sum(full.values()), sum(incremental.values())
    print(json.dumps({
        "rows": args.rows, "new_rows": new_rows,
        "full_s": {k: round(v, 3) for k, v in full.items()},
        "incremental_s": {k: round(v, 3) for k, v in incremental.items()},
        "ratio_incremental_vs_full_by_stage": {k: round(incremental[k] / full[k], 3) for k in STAGES},
        "ratio_incremental_vs_full": round(total_incr / total_full, 3),
        "incremental_runs": facts,
        "quiet_night_s": round(quiet_night_s, 3),
        "quiet_night_ratio_vs_full": round(quiet_night_s / total_full, 4),
        "quiet_night_skips_refresh": version_c == version_b,
        "new_rows_change_data_version": version_a != version_b,
    }))


if __name__ == "__main__":
    main()
