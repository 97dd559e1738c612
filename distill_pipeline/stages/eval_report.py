"""eval_report: does the student answer like the teacher, and what does it cost? The gate before promotion.

`build_eval_report` is the whole stage, read top to bottom:
  1. the adapter student_adapter recorded (its MLflow run, its losses) and the test split;
  2. the student's answers: the eval worker (`distill_pipeline.workers.eval`), started by the compute client on
     this machine or in a GPU pod, answers the raw test inputs under the task's schema (and a subset without it);
  3. the task's metrics on those answers, constrained and unconstrained, overall and per label;
  4. latency, tokens and cost per request of the student and of the teacher (its recorded usage);
  5. the gate: the headline metric at least eval.min_headline and no worse than the champion's by more than
     eval.champion_tolerance; a passing adapter becomes a version of the registered model, and the champion
     when it is at least as good as the current one;
  6. the report (HTML + JSON) and the rows the student got wrong, on disk and on the adapter's MLflow run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.clients.compute import BoundCompute, WorkerJob
from distill_pipeline.clients.tracking import ModelRegistry
from distill_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

EVAL_WORKER = "distill_pipeline.workers.eval"
FAILURES = "failures.parquet"
# The users' bar for a student that replaces the teacher, where the headline is an agreement.
DEFAULT_MIN_HEADLINE = {"extraction": 0.95, "classification": 0.95}


@dataclass
class Gate:
    passed: bool
    headline_metric: str
    headline_value: float | None
    higher_is_better: bool
    threshold: float | None
    champion_value: float | None
    reasons: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    report: dict[str, Any]
    gate: Gate
    html_path: Path
    json_path: Path
    failures_path: Path
    failures: int
    mlflow_run_id: str | None
    registered_version: str | None
    champion: bool


def build_eval_report(cfg: PipelineConfig, prompt_version: str, *, config_file: Path, compute: BoundCompute,
                      registry: ModelRegistry, logger: logging.Logger = log) -> EvalResult:
    import pandas as pd

    from distill_pipeline.stages import eval_html, eval_metrics
    from distill_pipeline.workers.eval import LATENCY, PREDICTIONS

    pv = prompt_version
    adapter_out = cfg.stage_dir("student_adapter", pv)
    record, train_result = adapter_lineage(adapter_out)
    out_dir = cfg.stage_dir("eval_report", pv)

    job = WorkerJob(cfg=cfg, config_file=config_file, prompt_version=pv, splits_dir=cfg.stage_dir("dataset_splits", pv),
                    output_dir=out_dir, module=EVAL_WORKER, num_processes=1, input_dirs=(adapter_out / "adapter",))
    compute.run(job)
    predictions = pd.read_parquet(out_dir / PREDICTIONS)
    latency = json.loads((out_dir / LATENCY).read_text())

    metrics, failures = eval_metrics.compute_metrics(cfg.task, predictions)
    free = predictions[predictions["output_unconstrained"].notna()]
    unconstrained = eval_metrics.compute_metrics(cfg.task, free.assign(output=free["output_unconstrained"]))[0] \
        if latency["constrained"] and len(free) else None
    costs = cost_comparison(cfg, pv, predictions, latency)

    champion = registry.champion(cfg.eval.registered_model)
    gate = decide_gate(cfg, metrics, champion)
    report = {
        "task_kind": cfg.task.kind, "headline_metric": gate.headline_metric, "headline_value": gate.headline_value,
        "gate_passed": gate.passed, "prompt_version": pv,
        "gate": {**gate.__dict__, "champion_version": champion and champion["version"]},
        "metrics": metrics, "unconstrained": unconstrained, "latency_and_cost": costs,
        "training": {"mlflow_run_id": record.get("mlflow_run_id"), "adapter_sha256": record.get("adapter_sha256"),
                     "final_train_loss": train_result.get("final_train_loss"),
                     "best_val_loss": train_result.get("best_val_loss"),
                     "loss_gap": _gap(train_result.get("best_val_loss"), train_result.get("final_train_loss"))},
        "rows": len(predictions), "failures": len(failures),
    }
    failures.to_parquet(out_dir / FAILURES, index=False)
    loss_curves = {"train": train_result.get("train_losses") or [], "val": train_result.get("val_losses") or []}
    html = eval_html.render_report(report, loss_curves=loss_curves, latency=costs,
                                   slices=metrics.get("slices"), failures=failures)
    html_path, json_path = eval_html.write_report(out_dir, report, html)

    run_id, version, is_champion = record.get("mlflow_run_id"), None, False
    if run_id:
        registry.log_to_run(run_id, out_dir, "eval_report", {
            "eval.headline": gate.headline_value or 0.0, "eval.gate_passed": float(gate.passed),
            **({"eval.unconstrained_headline": unconstrained["headline_value"]} if unconstrained else {})})
    if gate.passed and run_id:
        version = registry.register(cfg.eval.registered_model, run_id, "adapter", {
            "prompt_version": pv, "task_kind": cfg.task.kind, "headline_metric": gate.headline_metric,
            "headline_value": gate.headline_value, "adapter_sha256": record.get("adapter_sha256")})
        is_champion = champion is None or _at_least(gate.headline_value, gate.champion_value, gate.higher_is_better)
        if is_champion:
            registry.make_champion(cfg.eval.registered_model, version)
        logger.info(f"registered {cfg.eval.registered_model} version {version}"
                    + (" as champion" if is_champion else f" (champion stays version {champion['version']})"))
    return EvalResult(report, gate, html_path, json_path, out_dir / FAILURES, len(failures), run_id, version,
                      is_champion)


def adapter_lineage(adapter_out: Path) -> tuple[dict, dict]:
    """(student_adapter's record of the adapter in place, its training result with the loss curves)."""
    from distill_pipeline.stages.student_adapter import RECORD
    from distill_pipeline.stages.student_training import RESULT

    if not (adapter_out / RECORD).is_file():
        raise FileNotFoundError(f"no trained adapter recorded at {adapter_out}: materialize student_adapter for "
                                "this partition first")
    record = json.loads((adapter_out / RECORD).read_text())
    result = json.loads((adapter_out / RESULT).read_text()) if (adapter_out / RESULT).is_file() else {}
    return record, result


def decide_gate(cfg: PipelineConfig, metrics: dict[str, Any], champion: dict[str, Any] | None) -> Gate:
    value, higher = metrics.get("headline_value"), metrics.get("higher_is_better", True)
    threshold = cfg.eval.min_headline if cfg.eval.min_headline is not None else DEFAULT_MIN_HEADLINE.get(cfg.task.kind)
    champion_value = _float(champion.get("headline_value")) if champion else None
    reasons = []
    if value is None:
        reasons.append(f"no {metrics.get('headline_metric')} could be computed")
    elif threshold is None:
        reasons.append(f"eval.min_headline is not set: a {cfg.task.kind} task has no default bar for "
                       f"{metrics.get('headline_metric')}")
    elif not _at_least(value, threshold, higher):
        reasons.append(f"{metrics['headline_metric']} {value:.4f} {'<' if higher else '>'} eval.min_headline "
                       f"{threshold:g}")
    if value is not None and champion_value is not None:
        allowed = champion_value - cfg.eval.champion_tolerance if higher else champion_value + cfg.eval.champion_tolerance
        if not _at_least(value, allowed, higher):
            reasons.append(f"{metrics['headline_metric']} {value:.4f} is worse than the champion's {champion_value:.4f} "
                           f"by more than eval.champion_tolerance={cfg.eval.champion_tolerance:g}")
    return Gate(not reasons, metrics.get("headline_metric", "?"), value, higher, threshold, champion_value, reasons)


def cost_comparison(cfg: PipelineConfig, pv: str, predictions: Any, latency: dict[str, Any]) -> dict[str, Any]:
    """Tokens, latency and cost per request of the student (measured) and the teacher (its recorded usage on
    these inputs under this prompt version; estimated from its prompt when it has none)."""
    from distill_pipeline.clients.teacher import estimate_tokens
    from distill_pipeline.stages.prompts import load_prompts
    from distill_pipeline.stages.teacher_labels import read_labels

    try:
        labels = read_labels(cfg, pv, ["input", "tokens_in", "tokens_out", "latency_ms"]).to_pandas()
        used = labels[labels["input"].isin(set(predictions["input"])) & (labels["tokens_in"].fillna(0) > 0)]
    except FileNotFoundError:  # labelled outside this pipeline: nothing recorded
        used = []
    if len(used):
        teacher_in, teacher_out = float(used["tokens_in"].mean()), float(used["tokens_out"].mean())
        teacher_p50 = float(used["latency_ms"].median()) / 1000 if used["latency_ms"].notna().any() else None
        source = f"recorded usage of {len(used)} teacher answers"
    else:  # every test answer was a stored one: the prompt as the teacher saw it, counted
        prompt = load_prompts(cfg.prompts_dir).get(pv) if cfg.prompts_dir.is_dir() else None
        texts = predictions["input"].tolist()
        teacher_in = sum(estimate_tokens("".join(m["content"] for m in prompt.messages(t))) for t in texts) / len(texts) \
            if prompt else None
        teacher_out = float(predictions["target"].map(estimate_tokens).mean())
        teacher_p50 = None
        source = "estimated from the prompt (no recorded usage on these inputs)" if prompt else "unknown"
    tc, ec = cfg.teacher, cfg.eval
    student_in, student_out = latency["prompt_tokens_per_request"], latency["output_tokens_per_request"]
    teacher_cost = (teacher_in or 0) * tc.price_per_1m_input_tokens + (teacher_out or 0) * tc.price_per_1m_output_tokens
    student_cost = student_in * ec.student_price_per_1m_input_tokens + student_out * ec.student_price_per_1m_output_tokens
    return {
        "student": {"input_tokens": student_in, "output_tokens": student_out, "p50_s": latency["p50_s"],
                    "p95_s": latency["p95_s"], "batched_tokens_per_s": latency["batched_tokens_per_s"],
                    "cost_per_1m_requests_usd": student_cost},
        "teacher": {"input_tokens": teacher_in, "output_tokens": teacher_out, "p50_s": teacher_p50,
                    "cost_per_1m_requests_usd": teacher_cost, "source": source},
        "ratios": {"input_tokens": _ratio(teacher_in, student_in), "p50": _ratio(teacher_p50, latency["p50_s"]),
                   "cost": _ratio(teacher_cost, student_cost)},
    }


def _at_least(value: float | None, bar: float | None, higher_is_better: bool) -> bool:
    if value is None or bar is None:
        return bar is None
    return value >= bar if higher_is_better else value <= bar


def _ratio(teacher: float | None, student: float | None) -> float | None:
    return round(teacher / student, 2) if teacher and student else None


def _gap(val: float | None, train: float | None) -> float | None:
    return round(val - train, 4) if val is not None and train is not None else None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
