"""The training pod's entry point: `python -m distill_pipeline.workers.pod --prompt-version PV ...`.

Writes the config shipped in $DISTILL_CONFIG_YAML to a file, stages the splits in from object
storage when configured, starts the training worker exactly as the local backend does, and stages
its output (checkpoints included, so a re-run resumes) back out even when training failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from distill_pipeline.clients.compute import CONFIG_YAML_ENV, WORKER_MODULE, worker_command, worker_env
from distill_pipeline.clients.object_store import object_uri, pull_dir, push_dir


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m distill_pipeline.workers.pod ...`: the container's command.

    Writes the config shipped in $DISTILL_CONFIG_YAML to a file, stages data in from object
    storage when configured, runs the worker, and stages its output (checkpoints included,
    so a re-run resumes) back out even when training failed.
    """
    parser = argparse.ArgumentParser(prog="python -m distill_pipeline.workers.pod")
    parser.add_argument("--prompt-version", required=True)
    parser.add_argument("--splits-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--object-store-root")
    parser.add_argument("--home")
    parser.add_argument("--module", default=WORKER_MODULE)
    parser.add_argument("--input-dir", action="append", default=[], help="another folder the worker reads")
    args = parser.parse_args(argv)

    if args.object_store_root and not args.home:
        parser.error("--object-store-root needs --home (the pod's DISTILL_HOME on scratch)")
    text = os.environ.get(CONFIG_YAML_ENV)
    if not text:
        print(f"{CONFIG_YAML_ENV} is not set: the pod has no pipeline config", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(text)
        return _stage_and_train(args, config_file)


def _stage_and_train(args: argparse.Namespace, config_file: Path) -> int:
    splits, output = Path(args.splits_dir), Path(args.output_dir)
    if args.object_store_root:
        home = Path(args.home)
        splits_uri = object_uri(args.object_store_root, home, splits)
        if not pull_dir(splits_uri, splits):
            print(f"no dataset splits at {splits_uri}", file=sys.stderr)
            return 2
        for folder in map(Path, args.input_dir):
            if not pull_dir(object_uri(args.object_store_root, home, folder), folder):
                print(f"no input at {object_uri(args.object_store_root, home, folder)}", file=sys.stderr)
                return 2
        pull_dir(object_uri(args.object_store_root, home, output), output)  # earlier checkpoints: resume

    cmd = worker_command(
        python=sys.executable,
        num_processes=args.num_processes,
        config_file=str(config_file),
        prompt_version=args.prompt_version,
        splits_dir=str(splits),
        output_dir=str(output),
        module=args.module,
    )
    rc = _run_forwarding_signals(cmd, {**os.environ, **worker_env(args.cpu)})
    if args.object_store_root and output.exists():
        push_dir(output, object_uri(args.object_store_root, Path(args.home), output))
    return rc


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run the worker; a SIGTERM to the pod (eviction, preemption) reaches it, and we still get to
    stage its checkpoints out once it has stopped."""
    proc = subprocess.Popen(cmd, env=env)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
