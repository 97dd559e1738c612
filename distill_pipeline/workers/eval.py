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


def answer_by_batch(model, tokenizer, texts: list[str], *, instruction: str | None, max_new_tokens: int,
                    batch_size: int, constraint=None, on_batch=None) -> list:
    """student_generation.generate_answers, one batch at a time so that `on_batch(n)` can report progress.

    The batches are the ones generate_answers makes itself (prompts longest first, a stable sort, cut every
    batch_size), so the answers, and each answer's per-batch seconds, are those of one call on all texts."""
    from distill_pipeline.stages import formatting, student_generation

    lengths = [len(formatting.encode_prompt(tokenizer, text, instruction)) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        batch = student_generation.generate_answers(
            model, tokenizer, [texts[i] for i in members], instruction=instruction, max_new_tokens=max_new_tokens,
            batch_size=batch_size, constraint=constraint)
        for i, generated in zip(members, batch):
            out[i] = generated
        if on_batch is not None:
            on_batch(len(members))
    return out


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

    from distill_pipeline.console import WorkerProgress
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

        free_inputs = inputs[: ec.unconstrained_rows] if constraint is not None else []
        timed_inputs = inputs[: ec.latency_requests]
        progress = WorkerProgress(pipes, "eval", len(inputs) + len(free_inputs) + len(timed_inputs), "answers")

        def answer(texts: list[str], batch_size: int, with_constraint: bool, what: str):
            return answer_by_batch(model, tokenizer, texts, instruction=instruction, max_new_tokens=ec.max_new_tokens,
                                   batch_size=batch_size, constraint=constraint if with_constraint else None,
                                   on_batch=lambda n: progress.update(advance=n, detail=what))

        started = time.perf_counter()
        answers = answer(inputs, ec.batch_size, True, "constrained" if constraint is not None else "answers")
        batched_s = time.perf_counter() - started
        free = answer(free_inputs, ec.batch_size, False, "without the schema")
        timed = answer(timed_inputs, 1, True, "latency, one at a time")
        progress.close()

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
