"""Student generation on CPU: schema-constrained ÷ unconstrained greedy decoding, batch 1 and batch 8.

Everything goes through `stages/student_generation.generate_answers`, the path the eval report uses:
demo SEC sentences prompted through the model's chat template, left-padded batches, KV cache, greedy.

- free:   no constraint
- task:   the demo task's constraint (answer_schema: {"skip": true} or the event object). An untrained
          base model mostly answers {"skip": true}, a handful of tokens, so prefill dominates its rate.
- event:  only the event branch of that schema, so constrained answers are long (~70 tokens) like the
          free ones: the like-for-like per-token comparison, and the ratio on the last line.

Rates count generated tokens (EOS included) over wall time, prefill included; in a batch, rows that
finished early idle until the longest is done, so answers of uneven length (free ones) lower the rate
at batch 8. ms_per_step is wall time per forward of a batch (its longest answer's token count), the
like-for-like cost; mask_ms_per_step the part of it inside the constraint's logits processor
(measured by wrapping it).
Settings are paired chunk by chunk (see main) and the median of --repeats taken, since the load on a
shared 2-core machine drifts.

Model: the demo student's base, SmolLM2-135M-Instruct (its GGUF dequantized to float32), unless
--model names another Hugging Face model directory.

    .venv/bin/python bench/generation.py [--inputs 16] [--max-new-tokens 96] [--repeats 1]

Last line: one JSON object (ratio_constrained_vs_free_b1/_b8 of tokens/s, step_time_ratio_..., ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distill_pipeline.config import BaseModelConfig, load_config  # noqa: E402
from distill_pipeline.demo.data import generate_rows  # noqa: E402
from distill_pipeline.stages import student_generation, student_model  # noqa: E402
from distill_pipeline.stages.task_schema import answer_schema  # noqa: E402
from distill_pipeline.stages.tasks import parse_output  # noqa: E402

MASK_SECONDS = {"total": 0.0, "steps": 0}


def _timed_masker() -> None:
    """Count the time spent computing and applying masks (bench instrumentation only)."""
    call = student_generation._Masker.__call__

    def timed(self, input_ids, scores):
        started = time.perf_counter()
        out = call(self, input_ids, scores)
        MASK_SECONDS["total"] += time.perf_counter() - started
        MASK_SECONDS["steps"] += 1
        return out

    student_generation._Masker.__call__ = timed


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: the demo student's base)")
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()

    _timed_masker()
    task = load_config(env={}).task
    location = args.model or student_model.prepare_base(BaseModelConfig(), BaseModelConfig().cache_root())
    tokenizer = student_model.load_tokenizer(location)
    model = student_model.load_model(location, torch.float32)
    inputs = list(dict.fromkeys(row.sentence for row in generate_rows(8 * args.inputs, seed=3)))[: args.inputs]
    started = time.perf_counter()
    constraints = {"free": None, "task": student_generation.task_constraint(task, tokenizer)}
    schema = answer_schema(task)
    event = next(s for s in schema["anyOf"] if "skip" not in s["properties"]) if "anyOf" in schema else schema
    constraints["event"] = student_generation.json_constraint(event, tokenizer)
    compile_s = (time.perf_counter() - started) / 2

    # Paired runs: each chunk of `batch` inputs is answered under every setting back to back (the order
    # rotating from chunk to chunk), so load from other processes on a shared machine falls on all alike.
    runs: dict[tuple[str, int], list[dict]] = {}
    names = list(constraints)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for repeat in range(args.repeats):
            totals = {name: {"tokens": 0, "wall_s": 0.0, "mask_s": 0.0, "steps": 0, "decode_steps": 0, "answers": []}
                      for name in names}
            for k, start in enumerate(range(0, len(inputs), batch)):
                chunk = inputs[start:start + batch]
                for name in names[k % len(names):] + names[: k % len(names)]:
                    MASK_SECONDS.update(total=0.0, steps=0)
                    began = time.perf_counter()
                    answers = student_generation.generate_answers(
                        model, tokenizer, chunk, instruction=task.instruction, max_new_tokens=args.max_new_tokens,
                        batch_size=batch, constraint=constraints[name])
                    total = totals[name]
                    total["wall_s"] += time.perf_counter() - began
                    total["tokens"] += sum(a.output_tokens for a in answers)
                    total["mask_s"] += MASK_SECONDS["total"]
                    total["steps"] += MASK_SECONDS["steps"]
                    total["decode_steps"] += max(a.output_tokens for a in answers)  # forwards of this batch
                    total["answers"] += answers
            for name, total in totals.items():
                answers = total["answers"]
                run = {"tokens": total["tokens"], "wall_s": total["wall_s"],
                       "tokens_per_s": total["tokens"] / total["wall_s"],
                       "parse_ok": sum(parse_output(task, a.text).ok for a in answers),
                       "finished": sum(a.finished for a in answers),
                       "mask_ms_per_step": 1000 * total["mask_s"] / max(total["steps"], 1),
                       "ms_per_step": 1000 * total["wall_s"] / total["decode_steps"]}
                if batch == 1:
                    run.update({k: v for k, v in student_generation.latency_summary(answers).items()
                                if k in ("p50_s", "p95_s")})
                runs.setdefault((name, batch), []).append(run)
                print(f"batch {batch:>2} {name:<5} {run['tokens']:>5} tokens {run['wall_s']:7.2f} s "
                      f"{run['tokens_per_s']:7.1f} tok/s  parse ok {run['parse_ok']}/{len(inputs)}  "
                      f"finished {run['finished']}/{len(inputs)}  {run['ms_per_step']:.1f} ms/step, "
                      f"mask {run['mask_ms_per_step']:.2f} of it",
                      flush=True)

    summary: dict = {"model": Path(location).name, "inputs": len(inputs), "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats, "constraint_compile_s": round(compile_s, 3),
                     "torch_threads": torch.get_num_threads()}
    for (name, batch), results in runs.items():
        for key in ("tokens_per_s", "ms_per_step", "mask_ms_per_step", "p50_s", "p95_s"):
            if key in results[0]:
                summary[f"{key}_{name}_b{batch}"] = round(statistics.median(r[key] for r in results), 4)
        summary[f"parse_ok_{name}_b{batch}"] = f"{results[0]['parse_ok']}/{len(inputs)}"
    for batch in {b for _, b in runs}:
        free = summary[f"tokens_per_s_free_b{batch}"]
        summary[f"ratio_constrained_vs_free_b{batch}"] = round(summary[f"tokens_per_s_event_b{batch}"] / free, 3)
        summary[f"ratio_task_vs_free_b{batch}"] = round(summary[f"tokens_per_s_task_b{batch}"] / free, 3)
        summary[f"step_time_ratio_constrained_vs_free_b{batch}"] = round(
            summary[f"ms_per_step_event_b{batch}"] / summary[f"ms_per_step_free_b{batch}"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
