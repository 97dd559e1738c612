"""What a failed run leaves for the person on call: a short summary file, and a webhook post when one is set.

The summary says which run, which prompt version, which steps failed and their first error line, and the
command that reruns it. Files land in <home>/alerts/ (newest also as latest.md). The webhook (Slack,
Mattermost, Teams incoming-webhook URL, read from the variable alerts.webhook_url_env names) gets
{"text": summary}; its URL carries a token, so it is never logged. A failed gate (a student below the bar)
is a verdict on the data, not an outage: it is summarised but not posted.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from distill_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


def root_error(error):
    """The user's exception inside Dagster's wrapping (a step error's innermost cause)."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def one_line(text: str, limit: int = 240) -> str:
    """The first non-empty line, URLs' passwords masked (errors quote connection strings), at most `limit` long."""
    from distill_pipeline.masking import mask_url

    line = mask_url(next((part.strip() for part in str(text).splitlines() if part.strip()), ""))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_line(error) -> str:
    """'RuntimeError: pod evicted' from a Dagster step error: its root cause, one line, with its class."""
    error = root_error(error)
    first = one_line(error.message)
    return first if (error.cls_name or "") in first.split(":")[0] else f"{error.cls_name}: {first}"


@dataclass
class RunFailure:
    run_id: str
    job: str
    partition: str | None
    trigger: str
    run_error: str
    failed_steps: list[tuple[str, str]] = field(default_factory=list)  # (step, first line of its error)
    failed_checks: list[tuple[str, dict]] = field(default_factory=list)  # (asset.check, its figures)
    gate_only: bool = False

    def text(self) -> str:
        what = f"{self.job}" + (f" [{self.partition}]" if self.partition else "")
        head = ("student below the bar (a gate check failed)" if self.gate_only else "run FAILED")
        lines = [f"distill_pipeline: {what}: {head}", "",
                 f"run: {self.run_id} (trigger: {self.trigger})"]
        if self.failed_steps:
            lines.append("failed steps:")
            lines += [f"  - {step}: {error}" for step, error in self.failed_steps]
        elif self.run_error:
            lines.append(f"error: {one_line(self.run_error)}")
        if self.failed_checks:
            lines.append("failed checks:")
            lines += [f"  - {name}: {json.dumps(figures, default=str)}" for name, figures in self.failed_checks]
        rerun = "distill materialize" + (f" --partition {self.partition}" if self.partition else "")
        if self.gate_only:
            lines += ["", "next: nothing is broken; the champion keeps serving. The eval report lists the rows the "
                          "student got wrong (failures.parquet): material for the next prompt or data change."]
        else:
            lines += ["", "next: the run's log in the Dagster UI has the full error; once the cause is fixed, "
                          f"re-execute from failure there, or run: {rerun}"]
        return "\n".join(lines) + "\n"


def write_summary(failure: RunFailure, home: Path) -> Path:
    folder = home / "alerts"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}-{failure.run_id[:8]}.md"
    path.write_text(failure.text())
    (folder / "latest.md").write_text(failure.text())
    return path


def post_webhook(url: str, text: str, timeout_s: float = 10.0) -> None:
    request = urllib.request.Request(url, data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def deliver(failure: RunFailure, cfg: PipelineConfig) -> tuple[Path, bool]:
    """(summary file, whether the webhook was posted). A webhook that fails is logged, never raised:
    the summary file is already there."""
    path = write_summary(failure, cfg.home)
    url = os.environ.get(cfg.alerts.webhook_url_env, "").strip()
    if not url or failure.gate_only:
        return path, False
    try:
        post_webhook(url, failure.text())
    except Exception as exc:  # noqa: BLE001 -- any failure to notify must not hide the summary
        log.warning(f"alert webhook (${cfg.alerts.webhook_url_env}) not notified: {type(exc).__name__}")
        return path, False
    return path, True
