"""The GGUF process: `python -m distill_pipeline.workers.gguf --config CFG --prompt-version PV`.

Merges the evaluated adapter into its full-precision base, writes the GGUF, and checks it against the
merged model through llama.cpp and through an independent reader (transformers with `gguf_file=`):
  merged/               the merged model (safetensors, tokenizer, chat template)
  <name>.gguf           the file to deploy
  parity.json           tokenization, greedy and (quantized types) tolerance figures
  gguf_answers.parquet  the GGUF's own schema-constrained answers on the eval rows, through the same
                        request path as `distill serve`
Run by `gguf_model` through the compute resource (locally or in a pod), like the training and eval workers.
Exit status 0 on success, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill_pipeline.distributed import is_main_process

MERGED = "merged"
PARITY = "parity.json"
GGUF_ANSWERS = "gguf_answers.parquet"
EXPORT = "export.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distill_pipeline.workers.gguf",
                                     description="Merge the adapter, write the GGUF, check its parity.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt-version", required=True)
    parser.add_argument("--splits-dir", help="folder with test.parquet")
    parser.add_argument("--output-dir", help="folder for merged/, the GGUF and parity.json")
    parser.add_argument("--adapter-dir", help="the adapter to export (default: student_adapter's)")
    parser.add_argument("--eval-dir", help="eval_report's folder (its predictions give the rows to check)")
    return parser.parse_args(argv)


def gguf_name(registered_model: str, prompt_version: str, out_type: str) -> str:
    return f"{registered_model}-{prompt_version}-{out_type.lower()}.gguf"


def merge_adapter(location: str, adapter_dir: Path, target: Path, chat_template: str | None = None) -> None:
    """The adapter merged into the float32 base, saved with the tokenizer and its chat template."""
    import shutil

    from distill_pipeline.stages import student_model

    model = student_model.load_student(location, adapter_dir, "float32")
    tokenizer = student_model.load_tokenizer(location, chat_template)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distill_pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"distill gguf: {exc}", file=sys.stderr)
        return 2
    if not is_main_process():
        return 0
    pv, gc = args.prompt_version, cfg.gguf
    output_dir = Path(args.output_dir) if args.output_dir else cfg.stage_dir("gguf_model", pv)
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir else cfg.stage_dir("student_adapter", pv) / "adapter"
    eval_dir = Path(args.eval_dir) if args.eval_dir else cfg.stage_dir("eval_report", pv)

    from distill_pipeline.console import WorkerProgress
    from distill_pipeline.workers.eval import PREDICTIONS
    from distill_pipeline.workers.train import reporter

    with reporter() as pipes:
        def say(line: str) -> None:
            (pipes.log.info if pipes is not None else lambda m: print(f"[gguf] {m}", flush=True))(line)

        import pandas as pd

        from distill_pipeline.serving import StudentModel
        from distill_pipeline.stages import gguf_export, gguf_parity, student_model
        from distill_pipeline.stages.formatting import user_message
        from distill_pipeline.stages.student_generation import task_grammar

        rows = pd.read_parquet(eval_dir / PREDICTIONS).head(gc.parity_rows)
        # Each parity row counts twice: checked against the merged model (all at once, check_parity has no
        # finer report), then answered through the serving path.
        progress = WorkerProgress(pipes, "gguf", 2 * len(rows), "rows")
        progress.update(0, detail="merging the adapter")
        output_dir.mkdir(parents=True, exist_ok=True)
        base = cfg.train.base_model
        location = student_model.prepare_base(base, base.cache_root())
        merged = output_dir / MERGED
        started = time.perf_counter()
        merge_adapter(location, adapter_dir, merged, base.chat_template)
        merge_s = time.perf_counter() - started
        say(f"merged {adapter_dir} into {location} -> {merged} ({merge_s:.1f} s)")
        progress.update(0, detail=f"writing {gc.out_type}")

        gguf_path = output_dir / gguf_name(cfg.eval.registered_model, pv, gc.out_type)
        started = time.perf_counter()
        info = gguf_export.write_gguf(merged, gguf_path, gc.out_type)
        export_s = time.perf_counter() - started
        say(f"wrote {gguf_path} ({info.size_bytes / 1e6:.1f} MB, {gc.out_type}) in {export_s:.1f} s")

        progress.update(0, detail="parity check")
        instruction = cfg.train.instruction if cfg.train.instruction is not None else cfg.task.instruction
        prompts = [user_message(text, instruction) for text in rows["input"]]
        report = gguf_parity.check_parity(gguf_path, merged, prompts, max_new_tokens=gc.max_new_tokens,
                                          out_type=gc.out_type, margin=gc.margin_nats)
        say(f"parity: {json.dumps(report.as_dict(), default=str)[:400]}")
        progress.update(len(rows), detail="answers through the serving path")

        # The GGUF's own answers, through the same path as `distill serve` (raw input, task grammar).
        student = StudentModel(gguf_path, task_grammar(cfg.task), instruction=instruction,
                               max_tokens=cfg.eval.max_new_tokens)
        answers = []
        for text in rows["input"]:
            reply = student.chat({"messages": [{"role": "user", "content": text}]})
            answers.append(reply["choices"][0]["message"]["content"])
            progress.update(advance=1, detail="answers through the serving path")
        progress.close()
        rows.assign(output=answers, merged_output=rows["output"]).to_parquet(output_dir / GGUF_ANSWERS, index=False)
        (output_dir / PARITY).write_text(json.dumps(report.as_dict(), indent=2, default=str))
        (output_dir / EXPORT).write_text(json.dumps({
            **info.as_dict(), "merge_s": round(merge_s, 3), "export_s": round(export_s, 3)}, indent=2, default=str))
        summary = {"gguf": str(gguf_path), "size_mb": round(info.size_bytes / 1e6, 1), "export_s": round(export_s, 2)}
        if pipes is not None:
            pipes.report_asset_materialization(metadata=summary)
        else:
            print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
