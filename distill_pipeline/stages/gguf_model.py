"""gguf_model: the evaluated student as one GGUF file that answers like the model that was evaluated.

`build_gguf_model` is the whole stage, read top to bottom:
  1. the adapter eval_report evaluated, and its gate (a student that did not pass is never exported);
  2. the GGUF worker (`distill_pipeline.workers.gguf`), started by the compute client here or in a pod:
     merge into the full-precision base, write the GGUF, check parity through llama.cpp and through
     transformers reading the GGUF, answer the eval rows through the serving path;
  3. the parity gate: tokenization identical, greedy answers equal (F16/F32/BF16) or within the
     quantization tolerances, and the task metric on the GGUF's own answers within gguf.max_metric_drop
     of the merged model's on the same rows;
  4. what goes with the file: an Ollama Modelfile, the task's JSON schema and grammar, a README;
  5. lineage: the figures on the adapter's MLflow run and as tags of its registered model version.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.clients.compute import BoundCompute, WorkerJob
from distill_pipeline.clients.tracking import ModelRegistry
from distill_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

GGUF_WORKER = "distill_pipeline.workers.gguf"
MANIFEST = "gguf_model.json"
SCHEMA = "schema.json"
GRAMMAR = "grammar.lark"
MODELFILE = "Modelfile"
README = "README.md"


@dataclass
class GgufResult:
    gguf_path: Path
    size_bytes: int
    out_type: str
    sha256: str
    passed: bool
    reasons: list[str]
    parity: dict[str, Any]
    metric: dict[str, Any]
    manifest_path: Path
    registered_version: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def build_gguf_model(cfg: PipelineConfig, prompt_version: str, *, config_file: Path, compute: BoundCompute,
                     registry: ModelRegistry, logger: logging.Logger = log) -> GgufResult:
    import pandas as pd

    from distill_pipeline.stages import eval_metrics, gguf_parity
    from distill_pipeline.stages.eval_report import adapter_lineage
    from distill_pipeline.workers import gguf as worker

    pv, gc = prompt_version, cfg.gguf
    adapter_out, eval_dir, out_dir = (cfg.stage_dir(s, pv) for s in ("student_adapter", "eval_report", "gguf_model"))
    record, _ = adapter_lineage(adapter_out)
    evaluated = _eval_summary(eval_dir)
    if record.get("mlflow_run_id"):
        evaluated["registered_version"] = registry.version_of_run(cfg.eval.registered_model, record["mlflow_run_id"])
    if not evaluated.get("gate_passed"):
        raise ValueError(f"the student of {pv} did not pass eval_report's gate ({evaluated.get('headline_metric')} "
                         f"{evaluated.get('headline_value')}); it is not exported")

    job = WorkerJob(cfg=cfg, config_file=config_file, prompt_version=pv, splits_dir=cfg.stage_dir("dataset_splits", pv),
                    output_dir=out_dir, module=GGUF_WORKER, num_processes=1,
                    input_dirs=(adapter_out / "adapter", eval_dir))
    compute.run(job)
    export = json.loads((out_dir / worker.EXPORT).read_text())
    parity = json.loads((out_dir / worker.PARITY).read_text())
    answers = pd.read_parquet(out_dir / worker.GGUF_ANSWERS)

    # The task metric, recomputed on both answer sets of the same rows.
    gguf_metrics = eval_metrics.compute_metrics(cfg.task, answers)[0]
    merged_metrics = eval_metrics.compute_metrics(cfg.task, answers.assign(output=answers["merged_output"]))[0]
    metric = {"name": gguf_metrics["headline_metric"], "gguf": gguf_metrics["headline_value"],
              "merged": merged_metrics["headline_value"], "rows": len(answers),
              "higher_is_better": gguf_metrics.get("higher_is_better", True)}
    reasons = gguf_parity.ParityReport(**parity).failures(parity_floors(cfg))
    reasons += metric_drop_failures(metric, gc.max_metric_drop)

    gguf_path = Path(export["path"])
    write_companions(cfg, pv, out_dir, gguf_path, record, evaluated, parity, metric)
    manifest = {"prompt_version": pv, "gguf_path": str(gguf_path), "size_bytes": export["size_bytes"],
                "out_type": export["out_type"], "sha256": export["sha256"], "passed": not reasons,
                "reasons": reasons, "parity": parity, "metric": metric, "export_s": export.get("export_s"),
                "adapter_sha256": record.get("adapter_sha256"), "mlflow_run_id": record.get("mlflow_run_id"),
                "registered_version": evaluated.get("registered_version"),
                "instruction": cfg.train.instruction if cfg.train.instruction is not None else cfg.task.instruction,
                "user_template": _user_template(cfg, pv)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    run_id, version = record.get("mlflow_run_id"), evaluated.get("registered_version")
    if run_id:
        with tempfile.TemporaryDirectory(prefix="gguf-mlflow-") as tmp:
            registry.log_to_run(run_id, _small_files(out_dir, Path(tmp)), "gguf_model", {
                "gguf.size_mb": export["size_bytes"] / 1e6, "gguf.parity_passed": float(not reasons),
                **{f"gguf.{k}": v for k, v in _numbers(parity).items()}})
    if version and not reasons:
        registry.tag_version(cfg.eval.registered_model, version, {
            "gguf_path": str(gguf_path), "gguf_sha256": export["sha256"], "gguf_type": export["out_type"],
            "gguf_parity": json.dumps(_numbers(parity)), "prompt_version": pv})
    logger.info(f"{gguf_path} ({export['size_bytes'] / 1e6:.1f} MB {export['out_type']}): "
                + ("parity holds" if not reasons else "; ".join(reasons)))
    return GgufResult(gguf_path, export["size_bytes"], export["out_type"], export["sha256"], not reasons, reasons,
                      parity, metric, out_dir / MANIFEST, version, {"export_s": export.get("export_s")})


def parity_floors(cfg: PipelineConfig) -> Any:
    from distill_pipeline.stages.gguf_parity import ParityFloors

    gc = cfg.gguf
    return ParityFloors(exact_greedy=gc.min_exact_greedy, tie_margin=gc.tie_margin,
                        float_max_mean_logprob_diff=gc.float_max_mean_logprob_diff,
                        confident_agreement=gc.min_confident_agreement, max_mean_logprob_diff=gc.max_mean_logprob_diff,
                        min_topk_overlap=gc.min_topk_overlap)


def metric_drop_failures(metric: dict[str, Any], max_drop: float) -> list[str]:
    gguf, merged = metric["gguf"], metric["merged"]
    if gguf is None or merged is None:
        return [f"{metric['name']} could not be computed on the GGUF's answers"]
    drop = merged - gguf if metric["higher_is_better"] else gguf - merged
    if drop > max_drop + 1e-12:
        return [f"{metric['name']} on the GGUF's answers {gguf:.4f} vs the merged model's {merged:.4f} "
                f"on the same {metric['rows']} rows: a drop of {drop:.4f} > gguf.max_metric_drop {max_drop:g}"]
    return []


def write_companions(cfg: PipelineConfig, pv: str, out_dir: Path, gguf_path: Path, record: dict, evaluated: dict,
                     parity: dict, metric: dict) -> None:
    """Modelfile (Ollama), schema.json and grammar.lark (what answers must follow), README.md."""
    from distill_pipeline.stages.student_generation import task_grammar
    from distill_pipeline.stages.task_schema import answer_schema

    schema = answer_schema(cfg.task)
    (out_dir / SCHEMA).write_text(json.dumps(schema, indent=2) + "\n")
    grammar = task_grammar(cfg.task)
    if grammar:
        (out_dir / GRAMMAR).write_text(grammar + "\n")
    (out_dir / MODELFILE).write_text(modelfile(gguf_path.name, _chat_template(out_dir), cfg.eval.max_new_tokens))
    data = _data_digests(cfg, pv)
    lines = [
        f"# {gguf_path.name}", "",
        f"The student of prompt version `{pv}`: `{cfg.train.base_model.source}` with its LoRA adapter merged in, "
        f"written as GGUF ({parity.get('out_type')}).", "",
        "| | |", "|---|---|",
        f"| base model | `{cfg.train.base_model.source}` |",
        f"| adapter sha256 | `{record.get('adapter_sha256')}` |",
        f"| MLflow run | `{record.get('mlflow_run_id')}` |",
        f"| registered model | `{cfg.eval.registered_model}` version {evaluated.get('registered_version')} |",
        *[f"| {name} split sha256 | `{digest}` |" for name, digest in data.items()],
        f"| eval {evaluated.get('headline_metric')} | {evaluated.get('headline_value')} |",
        f"| {metric['name']} on {metric['rows']} rows: GGUF / merged | {metric['gguf']} / {metric['merged']} |",
        *[f"| parity {k} | {v} |" for k, v in _numbers(parity).items()], "",
        "Answers follow `schema.json` (the exact grammar: `grammar.lark`). The student expects the raw input as "
        "the user message, without the teacher's rubric.", "",
        "- llama.cpp: `llama-server -m " + gguf_path.name + " --jinja` and send `grammar` from grammar.lark, or "
        "`response_format` with schema.json",
        "- Ollama: `ollama create student -f Modelfile`, then `ollama run student` (pass schema.json as `format`)",
        "- this project: `distill serve " + pv + "`", ""]
    (out_dir / README).write_text("\n".join(lines))


def modelfile(gguf_name: str, chat_template: str | None, max_tokens: int) -> str:
    """An Ollama Modelfile for a ChatML-style student (SmolLM2, Qwen2): template, stops, greedy parameters."""
    template = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                '<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n')
    system = _default_system(chat_template)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"', "PARAMETER temperature 0",
              f"PARAMETER num_predict {max_tokens}", ""]
    return "\n".join(lines)


def _default_system(chat_template: str | None) -> str | None:
    """The system prompt the chat template adds when there is none (SmolLM2 has one): the student was trained
    with it, so Ollama must send it too."""
    import re

    if not chat_template:
        return None
    found = re.search(r"<\|im_start\|>system\\n([^<]+?)<\|im_end\|>", chat_template)
    return found.group(1) if found else None


def _chat_template(out_dir: Path) -> str | None:
    from distill_pipeline.workers.gguf import MERGED

    config = out_dir / MERGED / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    jinja = out_dir / MERGED / "chat_template.jinja"
    return template or (jinja.read_text() if jinja.is_file() else None)


def _eval_summary(eval_dir: Path) -> dict[str, Any]:
    path = eval_dir / "eval_report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no eval report at {path}: materialize eval_report for this partition first")
    report = json.loads(path.read_text())
    return {"gate_passed": report.get("gate_passed"), "headline_metric": report.get("headline_metric"),
            "headline_value": report.get("headline_value"), "registered_version": None}


def _data_digests(cfg: PipelineConfig, pv: str) -> dict[str, str]:
    path = cfg.stage_dir("dataset_splits", pv) / "manifest.json"
    if not path.is_file():
        return {}
    splits = json.loads(path.read_text()).get("splits", {})
    return {name: info.get("sha256", "")[:16] for name, info in splits.items()}


def _user_template(cfg: PipelineConfig, pv: str) -> str | None:
    from distill_pipeline.stages.prompts import load_prompts

    prompt = load_prompts(cfg.prompts_dir).get(pv) if cfg.prompts_dir.is_dir() else None
    return prompt.user_template if prompt else None


def _numbers(data: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _small_files(out_dir: Path, folder: Path) -> Path:
    """`folder` filled with what MLflow keeps: everything but the GGUF and the merged weights (their sha256 and
    path are logged instead of a second copy of the model)."""
    import shutil

    for name in (MANIFEST, SCHEMA, GRAMMAR, MODELFILE, README, "parity.json", "export.json"):
        if (out_dir / name).is_file():
            shutil.copy2(out_dir / name, folder / name)
    return folder
