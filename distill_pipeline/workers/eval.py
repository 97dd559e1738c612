"""The evaluation process: `python -m distill_pipeline.workers.eval --config CFG --prompt-version PV`.

Loads the base model with the trained adapter merged in, answers the test split's raw inputs (batched
greedy decoding under the task's schema, plus a subset without it), times single requests, and writes:
  predictions.parquet   id, input, target (teacher), label, output (student), output_unconstrained,
                        prompt_tokens, output_tokens
  latency.json          batch-1 p50/p95 seconds per request, batched throughput, token counts
Run by `eval_report` through the compute resource (locally or in a pod), like the training worker.
Exit status 0 on success, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill_pipeline.distributed import is_main_process

PREDICTIONS = "predictions.parquet"
LATENCY = "latency.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill_pipeline.workers.eval",
                                     description="Answer the test split with the trained student.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt-version", required=True)
    parser.add_argument("--splits-dir", help="folder with test.parquet")
    parser.add_argument("--output-dir", help="folder for predictions.parquet and latency.json")
    parser.add_argument("--adapter-dir", help="the adapter to evaluate (default: student_adapter's)")
    return parser.parse_args(argv)


def test_rows(splits_dir: Path, limit: int | None) -> list[dict]:
    """The test split, or a fixed subset of it chosen by a hash of the row id (the same rows as it grows)."""
    import hashlib

    from distill_pipeline.stages.formatting import read_split

    rows = read_split(splits_dir / "test.parquet").to_pylist()
    if limit is not None and len(rows) > limit:
        rows = sorted(rows, key=lambda r: hashlib.blake2b(str(r["id"]).encode(), digest_size=8).digest())[:limit]
    return rows


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distill_pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"distill eval: {exc}", file=sys.stderr)
        return 2
    if not is_main_process():  # evaluation is one process
        return 0
    pv, ec = args.prompt_version, cfg.eval
    splits_dir = Path(args.splits_dir) if args.splits_dir else cfg.stage_dir("dataset_splits", pv)
    output_dir = Path(args.output_dir) if args.output_dir else cfg.stage_dir("eval_report", pv)
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir else cfg.stage_dir("student_adapter", pv) / "adapter"

    from distill_pipeline.workers.train import reporter

    with reporter() as pipes:
        def say(line: str) -> None:
            (pipes.log.info if pipes is not None else lambda m: print(f"[eval] {m}", flush=True))(line)

        import pyarrow as pa
        import pyarrow.parquet as pq

        from distill_pipeline.stages import student_generation, student_model

        rows = test_rows(splits_dir, ec.max_rows)
        inputs = [r["input"] for r in rows]
        base = cfg.train.base_model
        location = student_model.prepare_base(base, base.cache_root())
        tokenizer = student_model.load_tokenizer(location, base.chat_template, base.revision)
        model = student_model.load_student(location, adapter_dir, cfg.train.dtype, cfg.train.attn_implementation)
        instruction = cfg.train.instruction if cfg.train.instruction is not None else cfg.task.instruction
        constraint = student_generation.task_constraint(cfg.task, tokenizer) if ec.constrained else None
        say(f"{len(rows)} test rows of {pv}, adapter {adapter_dir}, constrained={constraint is not None}")

        def answer(texts: list[str], batch_size: int, with_constraint: bool):
            return student_generation.generate_answers(
                model, tokenizer, texts, instruction=instruction, max_new_tokens=ec.max_new_tokens,
                batch_size=batch_size, constraint=constraint if with_constraint else None, progress=pipes is None)

        started = time.perf_counter()
        answers = answer(inputs, ec.batch_size, True)
        batched_s = time.perf_counter() - started
        free = answer(inputs[: ec.unconstrained_rows], ec.batch_size, False) if constraint is not None else []
        timed = answer(inputs[: ec.latency_requests], 1, True)

        output_dir.mkdir(parents=True, exist_ok=True)
        unconstrained = [a.text for a in free] + [None] * (len(rows) - len(free)) if free \
            else [a.text for a in answers]  # without a constraint both columns are the same decoding
        pq.write_table(pa.table({
            "id": pa.array([str(r["id"]) for r in rows], pa.string()),
            "input": pa.array(inputs, pa.string()),
            "target": pa.array([r["target"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.string()),
            "output": pa.array([a.text for a in answers], pa.string()),
            "output_unconstrained": pa.array(unconstrained, pa.string()),
            "prompt_tokens": pa.array([a.prompt_tokens for a in answers], pa.int64()),
            "output_tokens": pa.array([a.output_tokens for a in answers], pa.int64()),
        }), output_dir / PREDICTIONS)
        out_tokens = sum(a.output_tokens for a in answers)
        latency = {
            "requests_timed": len(timed),
            "p50_s": percentile([a.seconds for a in timed], 50),
            "p95_s": percentile([a.seconds for a in timed], 95),
            "batched_rows": len(answers), "batch_size": ec.batch_size, "batched_s": batched_s,
            "batched_tokens_per_s": out_tokens / batched_s if batched_s else 0.0,
            "prompt_tokens_per_request": sum(a.prompt_tokens for a in answers) / max(len(answers), 1),
            "output_tokens_per_request": out_tokens / max(len(answers), 1),
            "constrained": constraint is not None, "unconstrained_rows": len(free),
        }
        (output_dir / LATENCY).write_text(json.dumps(latency, indent=2))
        summary = {"rows": len(rows), "p50_s": round(latency["p50_s"], 4),
                   "tokens_per_s": round(latency["batched_tokens_per_s"], 2)}
        if pipes is not None:
            pipes.report_asset_materialization(metadata=summary)
        else:
            print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
