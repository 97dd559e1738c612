"""Experiment tracking behind one small interface.

Training code calls a `Tracker` unconditionally; `NullTracker` does nothing, so
no training code ever branches on "is logging on".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """The do-nothing tracker: every call is accepted and dropped."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass
