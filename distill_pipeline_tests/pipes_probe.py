"""A process launched the way the training worker is launched (same arguments, env, launcher).

It checks the launch path itself: arguments, MLflow env, the number of data-parallel ranks
and that they really communicate (an all-reduce over gloo), and reports it through Pipes
from rank 0 only, as the worker does. It writes one file per rank into --output-dir.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from dagster_pipes import open_dagster_pipes


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--config", "--prompt-version", "--splits-dir", "--output-dir"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()

    accelerator = Accelerator()  # honours ACCELERATE_USE_CPU like the Trainer does
    value = torch.tensor([float(accelerator.process_index + 1)])
    if dist.is_initialized():
        dist.all_reduce(value)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({"sum": value.item()}))
    if os.environ.get("PROBE_WAIT_FOR_SIGTERM"):  # stands in for a long training that gets evicted
        def on_term(signum, frame):
            (out / "checkpoint-on-sigterm.json").write_text("{}")
            sys.exit(143)

        signal.signal(signal.SIGTERM, on_term)
        (out / "ready").write_text("")
        time.sleep(120)
        sys.exit(1)
    if accelerator.is_main_process:
        report(args, accelerator, value)
    # All ranks leave together with the process group shut down, as the training worker does (leave_together): a rank that
    # exits while another still holds its gloo connections can abort it ("terminate called without an
    # active exception", SIGABRT), which made this test fail now and then.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report(args, accelerator, value) -> None:
    with open_dagster_pipes() as pipes:
        pipes.report_asset_materialization(metadata={
            "world_size": accelerator.num_processes,
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "allreduce_sum": value.item(),
            "config_exists": Path(args.config).is_file(),
            "prompt_version": args.prompt_version,
            "splits_dir": args.splits_dir,
            "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID", ""),
            "use_cpu": os.environ.get("ACCELERATE_USE_CPU", ""),
            "partition": pipes.partition_key,
        })


if __name__ == "__main__":
    main()
