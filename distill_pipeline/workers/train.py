"""The training process: `python -m distill_pipeline.workers.train --config CFG --prompt-version PV`.

Runs the same on a laptop, a local GPU box or a Kubernetes pod; for data parallelism start it
under `accelerate launch --num_processes N -m distill_pipeline.workers.train ...` (every rank
trains, rank 0 writes the adapter and reports). When Dagster launched it through Pipes
(DAGSTER_PIPES_CONTEXT in the environment) rank 0 streams its log lines and the final
materialization metadata to Dagster; otherwise it prints them. Experiment tracking comes
from the environment (MLFLOW_TRACKING_URI + MLFLOW_RUN_ID -> that MLflow run).

Default paths: --splits-dir <home>/artifacts/dataset_splits/<pv>,
               --output-dir <home>/artifacts/student_adapter/<pv>.
Exit status 0 on success, 1 when training failed, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from distill_pipeline.distributed import is_main_process

PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"  # dagster_pipes.DAGSTER_PIPES_CONTEXT_ENV_VAR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill_pipeline.workers.train",
                                     description="Train the student's LoRA adapter on one prompt version.")
    parser.add_argument("--config", required=True, help="pipeline YAML (environment overrides apply)")
    parser.add_argument("--prompt-version", required=True, help="partition key, e.g. sec-events-v1-0123abcd")
    parser.add_argument("--splits-dir", help="folder with train.parquet and val.parquet")
    parser.add_argument("--output-dir", help="folder for checkpoints/, adapter/ and train_result.json")
    return parser.parse_args(argv)


@contextlib.contextmanager
def reporter() -> Iterator[Any]:
    """Dagster Pipes on rank 0 of a Pipes-launched process, else None (plain printing)."""
    if is_main_process() and PIPES_CONTEXT_ENV in os.environ:
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            yield pipes
    else:
        yield None


def format_metrics(data: dict) -> str:
    return " ".join(f"{key}={data[key]:.4g}" for key in ("loss", "eval_loss", "learning_rate", "grad_norm")
                    if key in data)


def format_event(kind: str, data: dict) -> str:
    if kind == "progress":
        return " ".join(filter(None, [f"step {data.get('step')}/{data.get('max_steps')}", format_metrics(data)]))
    return f"{kind}: " + json.dumps(data, default=str, sort_keys=True)


def pipes_line(kind: str, data: dict) -> str:
    """What goes to Dagster: training steps as progress messages (the orchestrating `distill` draws them as a
    bar, distill_pipeline.console), anything else as format_event has it."""
    if kind == "progress" and data.get("step") is not None and data.get("max_steps"):
        from distill_pipeline.console import progress_message

        return progress_message("train", data["step"], data["max_steps"], "steps", format_metrics(data))
    return format_event(kind, data)


def samples_markdown(samples: list[dict]) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")[:400]

    rows = ["| id | input | teacher | student |", "|---|---|---|---|"]
    rows += [f"| {cell(s['id'])} | {cell(s['input'])} | {cell(s['target'])} | {cell(s['output'])} |" for s in samples]
    return "\n".join(rows)


def materialization_metadata(result: Any, tracker: Any, adapter_sha256: str) -> dict[str, Any]:
    """What the student_adapter materialization shows (plain values Pipes can carry)."""
    meta: dict[str, Any] = {
        "adapter_path": {"raw_value": str(result.adapter_dir), "type": "path"},
        "adapter_sha256": adapter_sha256,
        "base_model": result.base_model,
        "initial_val_loss": result.initial_val_loss,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "final_train_loss": result.final_train_loss,
        "steps": result.steps,
        "max_steps": result.max_steps,
        "epochs": result.epochs,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "train_examples": result.train_examples,
        "val_examples": result.val_examples,
        "skipped_rows": {"raw_value": result.skipped, "type": "json"},
        "train_tokens": result.train_tokens,
        "tokens_per_s": round(result.tokens_per_s, 2),
        "train_seconds": result.seconds,
        "world_size": result.world_size,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "mlflow_run_id": getattr(tracker, "run_id", None),
    }
    if result.samples:
        meta["samples"] = {"raw_value": samples_markdown(result.samples), "type": "md"}
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distill_pipeline.clients.tracking import tracker_from_env
    from distill_pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"distill train: {exc}", file=sys.stderr)
        return 2
    pv = args.prompt_version
    splits_dir = Path(args.splits_dir) if args.splits_dir else cfg.stage_dir("dataset_splits", pv)
    output_dir = Path(args.output_dir) if args.output_dir else cfg.stage_dir("student_adapter", pv)

    with reporter() as pipes:
        def report(kind: str, data: dict) -> None:
            if not is_main_process():
                return
            if pipes is not None:
                (pipes.log.warning if kind == "warning" else pipes.log.info)(pipes_line(kind, data))
            else:
                print(f"[train {time.strftime('%H:%M:%S')}] {format_event(kind, data)}", flush=True)

        from distill_pipeline.stages.student_training import train_student

        tracker = tracker_from_env()
        report("info", {"prompt_version": pv, "splits_dir": str(splits_dir), "output_dir": str(output_dir),
                        "mlflow_run_id": tracker.run_id})
        result = train_student(cfg, splits_dir, output_dir, tracker=tracker, report=report)
        if is_main_process():
            report_adapter(result, output_dir, tracker, pipes)
        leave_together()
    return 0


def leave_together() -> None:
    """Every rank exits together, with the process group shut down: a rank that exits while rank 0 still holds
    its gloo/NCCL connections (uploading the adapter) can abort rank 0 ("terminate called without an active
    exception", SIGABRT), and the launcher then fails a run whose adapter was saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report_adapter(result, output_dir, tracker, pipes) -> None:
    """Rank 0: the adapter and its result to the tracker, the materialization to Dagster (or stdout)."""
    from distill_pipeline.clients.tracking import file_sha256
    from distill_pipeline.stages.student_training import RESULT
    from distill_pipeline.stages.student_model import ADAPTER_WEIGHTS

    adapter_sha = file_sha256(Path(result.adapter_dir) / ADAPTER_WEIGHTS)
    tracker.log_artifact(Path(result.adapter_dir), "adapter")
    tracker.log_artifact(Path(output_dir) / RESULT, "train_result")
    metadata = materialization_metadata(result, tracker, adapter_sha)
    if pipes is not None:
        pipes.report_asset_materialization(metadata=metadata, data_version=adapter_sha[:16])
    else:
        print(json.dumps({k: (v["raw_value"] if isinstance(v, dict) and "raw_value" in v else v)
                          for k, v in metadata.items() if k != "samples"}, default=str), flush=True)


if __name__ == "__main__":
    sys.exit(main())
