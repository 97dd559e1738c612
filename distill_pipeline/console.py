"""What `distill demo` and `distill materialize` show a person, and the log file that keeps everything.

The terminal gets one line per stage as it finishes, with the key figures its materialization recorded (read
from the run's own events as they happen, never recomputed), one line per failed step or failed blocking
check, progress bars on the long work, and the paths at the end. The log file
(<home>/logs/distill-<command>-<timestamp>.log) gets everything: every Dagster event at DEBUG, every Python
log record, and whatever the process and its worker subprocesses write to stdout and stderr.

How: `session()` keeps the terminal for itself (duplicates of the original stdout and stderr) and points file
descriptors 1 and 2 at the log file, so nothing reaches the terminal by accident (library warnings, worker
output, Dagster's mirroring of captured compute logs). The Dagster run gets `Session.dagster_logger()` as its
only logger: it writes each record to the log file in Dagster's console format and hands the events to
`_RunEvents`, which prints the stage lines and draws the bars.

Bars (tqdm) go to the terminal's stderr, only when it is a terminal or DISTILL_PROGRESS=1 (DISTILL_PROGRESS=0:
never). In-process stages draw theirs with `progress_bar()`. The worker processes (training, evaluation, GGUF)
report through Dagster Pipes log messages written by `WorkerProgress` (`progress <task> <done>/<total> <unit>`),
which the orchestrating process turns into bars: the same for a local subprocess and a Kubernetes pod.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from distill_pipeline.alerts import one_line, root_error

PROGRESS_ENV = "DISTILL_PROGRESS"  # 1: bars even when stderr is not a terminal; 0: never
DAGSTER_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # Dagster's own console format
PYTHON_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attribute under which Dagster puts the structured metadata (and the DagsterEvent) on the records it
# hands to loggers; dagster's own json_console_logger reads the same one.
DAGSTER_META = "dagster_meta"

_active: Session | None = None


def wants_progress(stream: Any) -> bool:
    """Bars on `stream`: DISTILL_PROGRESS=1 forces them, 0 turns them off, otherwise only on a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def current() -> Session | None:
    """The session of this `distill` command, if it opened one."""
    return _active


def say(line: str = "") -> None:
    """A line for the person at the terminal: above the bars in a session, else plain stdout."""
    if _active is not None:
        _active.say(line)
    else:
        print(line, flush=True)


def shows_progress() -> bool:
    """Whether `progress_bar` draws anything here (to skip work done only for a bar, such as counting)."""
    return _active.progress if _active is not None else wants_progress(sys.stderr)


def progress_bar(desc: str, *, total: int | None = None, unit: str = "it", disable: bool = False, **kwargs: Any):
    """A tqdm bar for in-process work: on the session's terminal in a `distill` command, else on stderr, and
    only where `wants_progress` says so (never in a Dagster UI run's captured output)."""
    stream = _active.err if _active is not None else sys.stderr
    return Bar(total=total, desc=desc, unit=unit, file=stream, disable=disable or not shows_progress(),
               mininterval=kwargs.pop("mininterval", 0.5), ncols=columns(stream), **kwargs)


class Bar(tqdm):
    """A bar that is drawn once more, complete, when it closes, then makes way for the stage's line: transient
    (leave=False) unless asked otherwise."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("leave", False)
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if not self.disable:  # (tqdm's close disables the bar: a second close does nothing)
            self.refresh()
        super().close()


def columns(stream: Any) -> int:
    """The terminal's width for a bar; a terminal that reports none (0 columns: a bare pty), $COLUMNS or 100."""
    try:
        width = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        width = 0
    if width <= 0:
        try:
            width = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            width = 0
    return width if width > 0 else 100


# --- progress of worker processes, through Dagster Pipes log messages ----------------------------------------

_PROGRESS = re.compile(r"^progress (?P<task>[\w.-]+) (?P<done>\d+)/(?P<total>\d+) (?P<unit>[\w-]+)"
                       r"(?: \((?P<detail>.*)\))?$")


@dataclass(frozen=True)
class Progress:
    task: str
    done: int
    total: int
    unit: str
    detail: str = ""


def progress_message(task: str, done: int, total: int, unit: str, detail: str = "") -> str:
    """`progress eval 8/72 answers (constrained)`: readable in the Dagster UI, parsed by `parse_progress`."""
    return f"progress {task} {int(done)}/{int(total)} {unit}" + (f" ({detail})" if detail else "")


def parse_progress(message: str) -> Progress | None:
    match = _PROGRESS.match(message or "")
    if match is None:
        return None
    return Progress(match["task"], int(match["done"]), int(match["total"]), match["unit"], match["detail"] or "")


class WorkerProgress:
    """Progress of one piece of work in a worker process. Under Pipes: progress messages (at most one per
    `min_interval_s`, but always the last one and any that changes `detail`), which the orchestrating
    `distill` draws as a bar; run by hand: a bar on the worker's own stderr (when it is a terminal)."""

    def __init__(self, pipes: Any, task: str, total: int, unit: str, *, min_interval_s: float = 0.5):
        self.pipes, self.task, self.total, self.unit = pipes, task, int(total), unit
        self.min_interval_s = min_interval_s
        self.done = 0
        self._sent_at = float("-inf")
        self._detail: str | None = None
        self._bar = None if pipes is not None else progress_bar(task, total=self.total, unit=unit)

    def update(self, done: int | None = None, *, advance: int = 0, detail: str = "") -> None:
        self.done = min(self.total, int(done) if done is not None else self.done + advance)
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            if detail:
                self._bar.set_postfix_str(detail, refresh=False)
            return
        now = time.monotonic()
        if self.done >= self.total or detail != self._detail or now - self._sent_at >= self.min_interval_s:
            self.pipes.log.info(progress_message(self.task, self.done, self.total, self.unit, detail))
            self._sent_at, self._detail = now, detail

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- the session --------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """What one running step has reported so far."""

    started: float = field(default_factory=time.monotonic)
    partition: str | None = None
    asset: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool, str, dict[str, Any]]] = field(default_factory=list)  # name, passed, severity, figures


class Session:
    """The terminal of one `distill` command and its log file; see the module docstring."""

    def __init__(self, log_path: Path, out: io.TextIOBase, err: io.TextIOBase, log: io.TextIOBase, progress: bool):
        self.log_path, self.out, self.err, self.log, self.progress = log_path, out, err, log, progress
        self.outputs: list[tuple[str, str]] = []  # (what, path) of this command's reports and GGUFs
        self._lock = threading.RLock()
        self._bars: dict[tuple[str, str], Any] = {}
        # What the runs reported so far; here, not in the handler: Dagster may set up a run's loggers more than once.
        self._steps: dict[tuple[str | None, str], _Step] = {}  # (run id, step key)
        self._runs_with_failed_steps: set[str | None] = set()

    # terminal
    def say(self, line: str = "") -> None:
        with self._lock, tqdm.external_write_mode(file=self.err):  # clears this terminal's bars, then redraws
            self.out.write(line + "\n")
            self.out.flush()

    def show_progress(self, step: str, progress: Progress) -> None:
        if not self.progress:
            return
        with self._lock:
            bar = self._bars.get((step, progress.task))
            if bar is None:
                desc = step if progress.task in step else f"{step} {progress.task}"
                bar = self._bars[(step, progress.task)] = Bar(
                    total=progress.total, initial=progress.done, desc=desc, unit=progress.unit, file=self.err,
                    ncols=columns(self.err), mininterval=0.2)
            bar.total = progress.total
            if progress.detail:  # what fits beside a bar of a useful width, cut between words
                room = max(0, bar.ncols - len(bar.desc) - 60)
                bar.set_postfix_str(_fit(progress.detail, room), refresh=progress.done == bar.n)
            bar.update(progress.done - bar.n)

    def close_bars(self, step: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._bars if step is None or k[0] == step]:
                self._bars.pop(key).close()

    # Dagster
    def dagster_logger(self):
        """The run's logger: every record to the log file at DEBUG, the events to the terminal as stage lines."""
        import dagster as dg

        def make(_init_context: Any) -> logging.Logger:
            logger = logging.Logger("dagster", logging.DEBUG)  # outside logging's tree: nothing reaches the root
            handler = logging.StreamHandler(self.log)
            handler.setFormatter(logging.Formatter(DAGSTER_FORMAT))
            logger.addHandler(handler)
            logger.addHandler(_RunEvents(self))
            return logger

        return dg.LoggerDefinition(make, description="distill: Dagster's log to the command's log file, one line "
                                                     "per stage and progress bars to the terminal")


@contextmanager
def session(home: Path, command: str) -> Iterator[Session]:
    """Terminal for the person, everything else to <home>/logs/distill-<command>-<timestamp>.log."""
    global _active
    logs = Path(home).expanduser().resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = _new_file(logs, f"distill-{command}-{time.strftime('%Y%m%d-%H%M%S')}")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    out, err = _terminal(sys.stdout), _terminal(sys.stderr)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    for fd in (1, 2):  # the process's and its subprocesses' raw output: into the log
        os.dup2(log_fd, fd)
    os.close(log_fd)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(PYTHON_FORMAT))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    logging.captureWarnings(True)
    active = Session(log_path, out, err, log, wants_progress(err))
    from distill_pipeline.masking import mask_url

    logging.getLogger("distill").info("distill %s: %s", command, mask_url(" ".join(sys.argv[1:])))
    _active = active
    try:
        yield active
    except SystemExit as exc:
        logging.getLogger("distill").error("distill %s exits: %s", command, exc.code)
        raise
    except BaseException:
        logging.getLogger("distill").exception("distill %s failed", command)
        raise
    finally:
        _active = None
        active.close_bars()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        logging.captureWarnings(False)
        root.handlers, root.level = old_handlers, old_level
        handler.close()
        log.close()
        for stream in (out, err):
            if stream not in (sys.stdout, sys.stderr):
                stream.close()


def _new_file(folder: Path, stem: str) -> Path:
    for n in range(1, 1000):
        path = folder / (f"{stem}.log" if n == 1 else f"{stem}-{n}.log")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free log file name for {stem} in {folder}")


def _terminal(stream: Any) -> Any:
    """A stream on what `stream` writes to now (a duplicate descriptor), kept when fd 1/2 go to the log."""
    try:
        fileno = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream  # not a file (an in-process test's capture): keep writing to it
    return open(os.dup(fileno), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace")


# --- the run's events as stage lines ------------------------------------------------------------------------


class _RunEvents(logging.Handler):
    """Dagster's records to the terminal: a stage line when a step ends, failures, bars from worker progress."""

    def __init__(self, session: Session):
        super().__init__(logging.DEBUG)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, DAGSTER_META, None) or {}
        event, step = meta.get("dagster_event"), meta.get("step_key")
        with self.session._lock:
            if event is None:
                self._message(step, meta.get("orig_message") or record.getMessage(), record.levelno)
            else:
                self._event(event, meta.get("run_id"), step)

    def _message(self, step: str | None, message: str, level: int) -> None:
        progress = parse_progress(message)
        if progress is not None and step:
            self.session.show_progress(step, progress)
        elif level >= logging.WARNING:  # what a stage or Dagster warns about, e.g. a step not run
            self.session.say(f"  {step or 'run':<17}{logging.getLevelName(level).lower()}: {one_line(message)}")

    def _event(self, event: Any, run_id: str | None, step: str | None) -> None:
        import dagster as dg

        kind, data, steps, session = event.event_type, event.event_specific_data, self.session._steps, self.session
        if kind == dg.DagsterEventType.STEP_START and step:
            steps[(run_id, step)] = _Step()
        elif kind == dg.DagsterEventType.ASSET_MATERIALIZATION and step:
            mat = data.materialization
            state = steps.setdefault((run_id, step), _Step())
            state.asset, state.partition = mat.asset_key.to_user_string(), mat.partition
            state.metadata = {k: getattr(v, "value", v) for k, v in (mat.metadata or {}).items()}
        elif kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION and step:
            steps.setdefault((run_id, step), _Step()).checks.append(
                (data.check_name, bool(data.passed), str(getattr(data.severity, "value", data.severity)),
                 {k: getattr(v, "value", v) for k, v in (data.metadata or {}).items()}))
        elif kind == dg.DagsterEventType.STEP_SUCCESS and step:
            session.close_bars(step)
            self._finished(step, steps.pop((run_id, step), _Step()), (data.duration_ms or 0) / 1000)
        elif kind == dg.DagsterEventType.STEP_FAILURE and step:
            session.close_bars(step)
            state = steps.pop((run_id, step), _Step())
            session._runs_with_failed_steps.add(run_id)
            if state.metadata and any(not passed and severity == "ERROR" for _, passed, severity, _ in state.checks):
                # Materialized, then a blocking check failed: the figures and the check say it all.
                self._finished(step, state, time.monotonic() - state.started)
                return
            error = root_error(data.error) if data is not None else None
            what = one_line(error.message) if error is not None else one_line(event.message or "failed")
            session.say(f"  {step:<17}FAILED: {what}  (stack trace in the log)")
        elif kind == dg.DagsterEventType.STEP_SKIPPED and step:
            session.say(f"  {step:<17}skipped: {one_line(event.message or 'an upstream step did not pass')}")
        elif kind == dg.DagsterEventType.ENGINE_EVENT and step and (event.message or "").startswith("Step blocked"):
            session.say(f"  {step:<17}waiting: {event.message[len('Step '):]} (another run holds it)")
        elif kind == dg.DagsterEventType.RUN_FAILURE:
            if run_id not in session._runs_with_failed_steps:  # e.g. a resource or the run itself failed
                session.say(f"  {'run':<17}FAILED: {one_line(event.message or '')}")

    def _finished(self, step: str, state: _Step, seconds: float) -> None:
        checks = {name: figures for name, _, _, figures in state.checks}
        summary = summarize(state.asset or step, state.metadata, checks)
        warned = [name for name, passed, severity, _ in state.checks if not passed and severity != "ERROR"]
        if warned:
            summary += f"; check{'s' if len(warned) > 1 else ''} not passed (warning): {', '.join(warned)}"
        self.session.say(f"  {step:<17}{summary}  {_duration(seconds)}")
        for name, passed, severity, figures in state.checks:
            if not passed and severity == "ERROR":
                self.session.say(f"  check {state.asset or step}.{name} FAILED"
                                 + (f" [{state.partition}]" if state.partition else "")
                                 + f": {json.dumps(figures, default=str)}")
        if state.metadata.get("report_path"):  # (the prompt version is in both paths)
            self.session.outputs.append(("eval report", str(state.metadata["report_path"])))
        if state.metadata.get("gguf_path"):
            self.session.outputs.append(("GGUF", str(state.metadata["gguf_path"])))


def _fit(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    cut = text[: width + 1].rsplit(" ", 1)[0]
    return cut if len(cut) <= width else ""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


# --- key figures per asset, from the metadata it records (defs/assets.py) -------------------------------------


def _n(value: Any) -> str:
    return "?" if value is None else f"{int(value):,}"


def _f(value: Any, digits: int = 3) -> str:
    return "?" if value is None else f"{float(value):.{digits}f}"


def _source_rows(m: dict, checks: dict) -> str:
    return (f"{_n(m.get('rows_read'))} rows exported from {m.get('table', 'the table')} "
            f"({_n(m.get('rows_total'))} in {_n(m.get('shards'))} shards, {_n(m.get('days_rewritten'))} days rewritten)")


def _teacher_labels(m: dict, checks: dict) -> str:
    line = (f"{_n(m.get('rows'))} labels: {_n(m.get('reused'))} reused, {_n(m.get('cached'))} cached, "
            f"{_n(m.get('requested'))} asked; {_n(m.get('ok'))} ok, {_n(m.get('invalid'))} invalid, "
            f"{_n(m.get('failed'))} failed")
    if m.get("over_budget"):
        line += f", {_n(m['over_budget'])} over budget"
    return line + f"; ${float(m.get('run_cost_usd') or 0):.4f} this run"


def _curated_examples(m: dict, checks: dict) -> str:
    dropped = sorted(((k.removeprefix("dropped_"), v) for k, v in m.items() if k.startswith("dropped_") and v),
                     key=lambda kv: -kv[1])
    line = f"{_n(m.get('kept'))} of {_n(m.get('rows_in'))} rows kept"
    if dropped:
        line += "; dropped: " + ", ".join(f"{_n(v)} {k.replace('_', ' ')}" for k, v in dropped[:3])
        if len(dropped) > 3:
            line += f", {_n(sum(v for _, v in dropped[3:]))} other"
    return line


def _dataset_splits(m: dict, checks: dict) -> str:
    line = f"train {_n(m.get('train_rows'))} / val {_n(m.get('val_rows'))} / test {_n(m.get('test_rows'))} rows"
    if m.get("clusters_merged_for_leakage"):
        line += f", {_n(m['clusters_merged_for_leakage'])} clusters merged against leakage"
    return line


def _student_adapter(m: dict, checks: dict) -> str:
    if m.get("reused"):
        return f"adapter reused (same data and settings), best val loss {_f(m.get('best_val_loss'))}"
    line = (f"{_n(m.get('steps'))}/{_n(m.get('max_steps'))} steps, val loss {_f(m.get('initial_val_loss'))} -> "
            f"{_f(m.get('best_val_loss'))} (best)")
    if m.get("tokens_per_s"):
        line += f", {float(m['tokens_per_s']):,.0f} tokens/s"
    if m.get("resumed_from_step"):
        line += f", resumed from step {_n(m['resumed_from_step'])}"
    return line


def _eval_report(m: dict, checks: dict) -> str:
    metric = str(m.get("headline_metric") or "headline").replace("_", " ")
    line = f"{metric} {_f(m.get('headline_value'))}"
    if m.get("valid_json_rate") is not None:
        line += f", valid JSON {_f(m['valid_json_rate'])}"
    if m.get("unconstrained_headline") is not None:
        line += f" (without the schema {_f(m['unconstrained_headline'])})"
    if m.get("rows") is not None:
        line += f" on {_n(m['rows'])} test rows"
    costs = m.get("latency_and_cost") if isinstance(m.get("latency_and_cost"), dict) else {}
    if (costs.get("student") or {}).get("p50_s") is not None:
        line += f", p50 {float(costs['student']['p50_s']):.2f} s"
    if (costs.get("ratios") or {}).get("cost"):
        line += f", {float(costs['ratios']['cost']):g}x cheaper than the teacher"
    if m.get("gate_passed"):
        version = m.get("registered_version")
        return line + " - gate passed" + (f", registered as version {version}" if version else "")
    bar = (checks.get("student_meets_the_bar") or {}).get("threshold")
    return line + " - gate FAILED" + (f" (bar {_f(bar)})" if bar is not None else "")


def _gguf_model(m: dict, checks: dict) -> str:
    name = Path(str(m.get("gguf_path") or "model.gguf")).name
    line = f"{name}, {m.get('size_mb', '?')} MB {m.get('type', '')}".rstrip()
    line += ", parity " + ("passed" if m.get("parity_passed") else "FAILED")
    metric = m.get("task_metric")
    if isinstance(metric, dict) and metric.get("gguf") is not None:
        line += f", {str(metric.get('name', 'metric')).replace('_', ' ')} {_f(metric['gguf'])}"
    return line


SUMMARIES: dict[str, Callable[[dict, dict], str]] = {
    "source_rows": _source_rows, "teacher_labels": _teacher_labels, "curated_examples": _curated_examples,
    "dataset_splits": _dataset_splits, "student_adapter": _student_adapter, "eval_report": _eval_report,
    "gguf_model": _gguf_model,
}


def summarize(asset: str, metadata: dict[str, Any], checks: dict[str, dict[str, Any]] | None = None) -> str:
    """The key figures of one materialization (and its checks' figures, by check name), as one line; any
    other asset: its first plain figures."""
    if not metadata:
        return "done (nothing materialized)"
    known = SUMMARIES.get(asset)
    if known is not None:
        try:
            return known(metadata, checks or {})
        except (TypeError, ValueError) as exc:  # a figure of an unexpected type: still a line, not a crash
            logging.getLogger("distill").warning("summary of %s: %s", asset, exc)
    plain = [(k, v) for k, v in metadata.items() if isinstance(v, (int, float, str)) and not k.endswith("path")]
    return ", ".join(f"{k} {v}" for k, v in plain[:5]) or "done"
