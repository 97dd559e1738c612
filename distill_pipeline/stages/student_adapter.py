"""student_adapter: one LoRA adapter per prompt version, trained in its own process, traced in MLflow.

`build_student_adapter` is the whole stage, read top to bottom:
  1. the splits it trains on, with their digests;
  2. the key of everything the adapter depends on (training settings, data digests, compute, code);
     when the adapter in place was trained from the same key it is reported again: no second
     training, no second MLflow run (`train.retrain_unchanged: true` forces training);
  3. one MLflow run: tags, params, the splits as dataset inputs, the config;
  4. the training worker (`distill_pipeline.workers.train`), started by the compute client on this
     machine or in a GPU pod, logging into that run;
  5. the adapter logged as an artifact, the run closed, and the record of what it was trained from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from distill_pipeline import __version__
from distill_pipeline.clients import tracking
from distill_pipeline.clients.compute import BoundCompute, WorkerJob, pod_config_yaml, public_config
from distill_pipeline.config import PipelineConfig, TrainConfig
from distill_pipeline.stages.student_model import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_FILES, ADAPTER_WEIGHTS

log = logging.getLogger(__name__)

RECORD = "adapter_record.json"
# Config sections that say nothing about how the student was trained (or hold endpoints).
_NOT_TRAINING = {"home", "prompts_dir", "database", "source", "teacher", "curate", "compute", "tracking", "eval",
                 "gguf"}
_NOT_IN_KEY = {f"train.{name}" for name in TrainConfig.NOT_AFFECTING_ADAPTER}


@dataclass
class AdapterResult:
    adapter_dir: Path
    adapter_sha256: str
    reused: bool
    mlflow_run_id: str
    mlflow_run: str  # link to the run in the MLflow UI
    data: dict[str, dict[str, Any]]  # {split: {rows, sha256, path}}
    compute: dict[str, Any]
    worker: dict[str, Any] = field(default_factory=dict)  # what the worker reported (plain values)


def build_student_adapter(cfg: PipelineConfig, prompt_version: str, *, config_file: Path, compute: BoundCompute,
                          experiments: tracking.ExperimentStore, run_tags: Mapping[str, str],
                          logger: logging.Logger = log) -> AdapterResult:
    pv = prompt_version
    splits_dir = cfg.stage_dir("dataset_splits", pv)
    output_dir = cfg.stage_dir("student_adapter", pv)
    data = split_digests(splits_dir)

    compute_settings = compute.describe()
    commit, dirty = tracking.git_commit()
    params = training_params(cfg, pv, data, compute_settings)
    key = training_key(params, __version__, commit)
    record = None if cfg.train.retrain_unchanged else reusable_record(output_dir, key)
    if record is not None:
        logger.info(f"inputs unchanged since MLflow run {record['mlflow_run_id']}: reporting its adapter again "
                    "without training (train.retrain_unchanged: true forces training)")
        return AdapterResult(find_adapter_dir(output_dir), record["adapter_sha256"], True, record["mlflow_run_id"],
                             record["mlflow_run"], data, compute_settings, record["metadata"])
    (output_dir / RECORD).unlink(missing_ok=True)  # a crash must not leave the previous adapter's record

    tags = {**run_tags, tracking.TAG_GIT_COMMIT: commit,
            "distill.git_dirty": None if dirty is None else str(dirty).lower(),
            "distill.compute_backend": compute.backend}
    with experiments.run(f"{pv}-{run_tags.get('dagster.run_id', uuid.uuid4().hex)[:8]}", tags, params) as run:
        logger.info(f"MLflow run {run.run_id}: {run.link}")
        for name, context_tag in (("train", "training"), ("val", "validation")):
            run.log_dataset(data[name]["path"], f"{pv}/{name}", data[name]["sha256"], context_tag)
        run.log_text(pod_config_yaml(cfg), "config", "pipeline.yaml")

        job = WorkerJob(cfg=cfg, config_file=config_file, prompt_version=pv, splits_dir=splits_dir,
                       output_dir=output_dir, env=run.worker_env())
        worker = compute.run(job)

        adapter_dir = find_adapter_dir(output_dir)
        if adapter_dir is None:
            raise RuntimeError(f"the training worker finished but left no adapter ({ADAPTER_CONFIG}) under {output_dir}")
        if not run.has_artifacts("adapter"):  # the worker logs it; a worker without MLflow access does not
            for name in ADAPTER_FILES:
                if (adapter_dir / name).is_file():
                    run.log_artifact(adapter_dir / name, "adapter")
        adapter_sha = tracking.file_sha256(adapter_dir / ADAPTER_WEIGHTS)
    worker = {**worker.metadata, "mlflow_experiment_id": run.experiment_id}
    write_record(output_dir, key, adapter_sha, run.run_id, run.link, worker)
    return AdapterResult(adapter_dir, adapter_sha, False, run.run_id, run.link, data, compute_settings, worker)


def split_digests(splits_dir: Path) -> dict[str, dict[str, Any]]:
    """{split: {rows, sha256, path}} from the dataset_splits manifest, checked against the files."""
    manifest_path = splits_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no dataset splits at {splits_dir} (manifest.json missing): materialize "
                                "dataset_splits for this partition first")
    splits = json.loads(manifest_path.read_text()).get("splits", {})
    out = {}
    for name in ("train", "val"):
        path = splits_dir / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"dataset_splits is incomplete: {path} is missing")
        info = splits.get(name, {})
        out[name] = {"rows": info.get("rows"), "sha256": info.get("sha256") or tracking.file_sha256(path),
                     "path": path}
    return out


def training_params(cfg: PipelineConfig, prompt_version: str, data: dict[str, dict[str, Any]],
                    compute: dict[str, Any]) -> dict[str, Any]:
    """MLflow params: the training-relevant config, data digests and compute settings (no secrets)."""
    params: dict[str, Any] = {"prompt_version": prompt_version,
                              **tracking.flatten(public_config(cfg, exclude=_NOT_TRAINING))}
    for name, info in data.items():
        params[f"data.{name}.sha256"] = info["sha256"]
        params[f"data.{name}.rows"] = info["rows"]
    params.update({f"compute.{k}": v for k, v in compute.items()})
    return tracking.safe_params(params)


def find_adapter_dir(output_dir: Path) -> Path | None:
    for candidate in (output_dir / ADAPTER_DIR, output_dir):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


# --- the record of the adapter in place ---------------------------------------------------------
# A nightly run whose export brought no new rows (or a second `make demo`) would otherwise train the
# same adapter again: a GPU pod and a new MLflow run for identical inputs.


def training_key(params: dict[str, Any], code_version: str, commit: str | None) -> str:
    kept = {k: v for k, v in params.items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"params": kept, "code_version": code_version, "commit": commit}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reusable_record(output_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored record when the adapter in place was trained from `key` and is unchanged, else None."""
    path, adapter_dir = output_dir / RECORD, find_adapter_dir(output_dir)
    if adapter_dir is None or not path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("key") != key or record.get("adapter_sha256") != tracking.file_sha256(adapter_dir / ADAPTER_WEIGHTS):
        return None
    return record


def write_record(output_dir: Path, key: str, adapter_sha256: str, mlflow_run_id: str, mlflow_run: str,
                 metadata: dict[str, Any]) -> None:
    """Atomically record the adapter just trained (metadata: plain JSON values to report again)."""
    record = {"key": key, "adapter_sha256": adapter_sha256, "mlflow_run_id": mlflow_run_id,
              "mlflow_run": mlflow_run, "metadata": metadata}
    tmp = output_dir / f".{RECORD}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, output_dir / RECORD)
