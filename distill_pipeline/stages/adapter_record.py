"""The record of the adapter in place: what it was trained from, so unchanged inputs are not trained twice.

A nightly run whose export brought no new rows (or a second `make demo`) would otherwise
train the same adapter again: a GPU pod and a new MLflow run for identical inputs. The
`student_adapter` asset writes `adapter_record.json` after every successful training, keyed
by everything the training depends on (the MLflow params: training settings, data digests,
compute; plus the code version); when the key matches and the adapter file is still the one
recorded, the asset reports that adapter again instead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from distill_pipeline.clients.tracking import file_sha256
from distill_pipeline.config import TrainConfig
from distill_pipeline.stages.student_model import ADAPTER_WEIGHTS

RECORD = "adapter_record.json"
_NOT_IN_KEY = {f"train.{name}" for name in TrainConfig.NOT_AFFECTING_ADAPTER}


def training_key(params: dict[str, Any], code_version: str, commit: str | None) -> str:
    kept = {k: v for k, v in params.items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"params": kept, "code_version": code_version, "commit": commit}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reusable(output_dir: Path, adapter_dir: Path | None, key: str) -> dict[str, Any] | None:
    """The stored record when the adapter in place was trained from `key` and is unchanged, else None."""
    path = output_dir / RECORD
    if adapter_dir is None or not path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("key") != key or record.get("adapter_sha256") != file_sha256(adapter_dir / ADAPTER_WEIGHTS):
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


def forget(output_dir: Path) -> None:
    """Called before training starts: a crash must not leave a record of the previous adapter."""
    (output_dir / RECORD).unlink(missing_ok=True)
