"""The demo student as GGUF: export time and size per type, and the served student against the teacher.

Reads a DISTILL_HOME where `make demo` (or `distill materialize ... --partition PV`) trained a student:
  1. merges that adapter into its base once, then writes the GGUF in each type (`--types`), timing each;
  2. serves the F16 file through `distill serve`'s own server (loopback HTTP, task grammar) and sends the
     test inputs one at a time with the `openai` client: p50 seconds per request (batch 1) and tokens/s;
  3. divides that p50 by the teacher's recorded p50 on the same inputs (teacher_labels' latency_ms: for the
     demo, the local stand-in teacher with its injected latency; for a team, its real API).

    .venv/bin/python bench/gguf.py [--home .distill] [--prompt-version PV] [--adapter-dir DIR] [--requests 16]

Last line: one JSON object: export_s and size_mb (by type), latency_ratio_vs_teacher, student_tokens_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This file's own folder comes first on sys.path, and its name would shadow the `gguf` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("DISTILL_HOME", str(REPO / ".distill")))
    parser.add_argument("--config", default=None)
    parser.add_argument("--prompt-version", default=None, help="default: the first with a trained adapter")
    parser.add_argument("--adapter-dir", default=None, help="default: student_adapter's for the prompt version")
    parser.add_argument("--types", default="F16,Q8_0,Q5_0,Q4_0,F32")
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    os.environ["DISTILL_HOME"] = args.home

    from openai import OpenAI

    from distill_pipeline.config import load_config
    from distill_pipeline.serving import StudentModel, make_server, template_pattern
    from distill_pipeline.stages import gguf_export, student_model
    from distill_pipeline.stages.gguf_model import _user_template
    from distill_pipeline.stages.student_generation import task_grammar
    from distill_pipeline.stages.teacher_labels import read_labels
    from distill_pipeline.workers.eval import test_rows
    from distill_pipeline.workers.gguf import merge_adapter

    cfg = load_config(args.config)
    adapters = cfg.stage_dir("student_adapter")
    versions = sorted(p.name for p in adapters.glob("*") if (p / "adapter" / student_model.ADAPTER_WEIGHTS).is_file()) \
        if adapters.is_dir() else []
    pv = args.prompt_version or (versions[0] if versions else None)
    if pv is None:
        sys.exit(f"no trained adapter under {adapters}: run `make demo` first (or pass --home)")

    base = cfg.train.base_model
    location = student_model.prepare_base(base, base.cache_root())
    export_s, size_mb = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        merged = Path(tmp) / "merged"
        started = time.perf_counter()
        merge_adapter(location, Path(args.adapter_dir) if args.adapter_dir else adapters / pv / "adapter", merged,
                      base.chat_template)
        merge_s = time.perf_counter() - started
        files = {}
        for out_type in args.types.split(","):
            path = Path(tmp) / f"student-{out_type.lower()}.gguf"
            started = time.perf_counter()
            info = gguf_export.write_gguf(merged, path, out_type)
            export_s[out_type] = round(time.perf_counter() - started, 2)
            size_mb[out_type] = round(info.size_bytes / 1e6, 1)
            files[out_type] = path
            print(f"{out_type:5s} {size_mb[out_type]:8.1f} MB  {export_s[out_type]:6.2f} s", flush=True)

        inputs = [r["input"] for r in test_rows(cfg.stage_dir("dataset_splits", pv), args.requests)]
        template = _user_template(cfg, pv)
        instruction = cfg.train.instruction if cfg.train.instruction is not None else cfg.task.instruction
        student = StudentModel(files.get("F16", next(iter(files.values()))), task_grammar(cfg.task),
                               instruction=instruction, user_pattern=template_pattern(template) if template else None,
                               max_tokens=cfg.eval.max_new_tokens)
        server = make_server(student)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]
        client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused")
        seconds, tokens = [], 0
        client.chat.completions.create(model="student", messages=[{"role": "user", "content": inputs[0]}])  # warm-up
        for text in inputs:
            started = time.perf_counter()
            reply = client.chat.completions.create(model="student", messages=[{"role": "user", "content": text}])
            seconds.append(time.perf_counter() - started)
            tokens += reply.usage.completion_tokens
        server.shutdown()

    labels = read_labels(cfg, pv, ["input", "latency_ms"]).to_pandas()
    timed = labels[labels["latency_ms"].notna()]
    recorded = timed[timed["input"].isin(set(inputs))]["latency_ms"]
    teacher_source = "the same inputs"
    if len(recorded) < 5:  # most answers were reused from the table (no latency): every timed answer of the version
        recorded, teacher_source = timed["latency_ms"], f"all {len(timed)} timed answers of {pv}"
    teacher_p50 = float(recorded.median()) / 1000 if len(recorded) else None
    student_p50 = statistics.median(seconds)
    result = {
        "prompt_version": pv, "merge_s": round(merge_s, 2), "export_s": export_s, "size_mb": size_mb,
        "requests": len(seconds), "student_p50_s": round(student_p50, 4),
        "teacher_p50_s": round(teacher_p50, 4) if teacher_p50 else None, "teacher_answers_timed": int(len(recorded)),
        "teacher_p50_source": teacher_source,
        "latency_ratio_vs_teacher": round(student_p50 / teacher_p50, 3) if teacher_p50 else None,
        "student_tokens_per_s": round(tokens / sum(seconds), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
