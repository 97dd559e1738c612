"""teacher_labels: every input labelled under one prompt version, paying for each answer at most once.

For each source row (or a sticky sample of them, `teacher.sample_size`), in this order:
1. its input is NULL, empty or not UTF-8   -> status 'invalid_input', never sent (curation quarantines it);
2. it was stored with an output under this prompt version (its key, or a name its prompt file binds with
   `stored_as`, see stages/prompts.py) -> that output is reused (source 'reused', free); an identical input
   elsewhere in the table is then reused too;
3. the label cache (Postgres, keyed by (prompt version, sha256 of the input)) has its answer -> 'cached';
4. otherwise the teacher is asked ('requested'); identical inputs share one request.

Each answer is committed to the cache as soon as it arrives (group commit), long before the Parquet
file is written, so a killed run loses only the requests in flight, and a re-run only asks for what is
missing. Inputs the teacher never answered after the bounded attempts are kept with status 'failed'
and their error; answers that fail the task's validation with status 'invalid' and the raw text;
inputs left when the per-run budget ran out with status 'over_budget'. No row is ever dropped: the
file has one row per (sampled) source row.

Output: <home>/artifacts/teacher_labels/<prompt version>/labels.parquet with columns
id, input, input_hash, output, confidence, created_at, prompt_version, source, status, error, input_problem,
tokens_in, tokens_out, cost_usd, latency_ms, attempts, teacher_model.
`cost_usd` is what the answer cost when it was bought (0 for reused); this run's spend is the sum over
source = 'requested'.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.clients.label_cache import CachedLabel, CacheWriter, LabelCache
from distill_pipeline.clients.postgres import Database
from distill_pipeline.clients.teacher import (ChatRequest, Completion, TeacherClient, TeacherEndpoint, TeacherFatalError,
                                             map_completions)
from distill_pipeline.config import PipelineConfig, TaskConfig, TeacherConfig
from distill_pipeline.stages.inputs import check_input
from distill_pipeline.stages.prompts import PromptVersion
from distill_pipeline.stages.tasks import parse_output

log = logging.getLogger(__name__)

STAGE = "teacher_labels"
LABELS_FILE = "labels.parquet"
SOURCES = ("reused", "cached", "requested", "skipped")
STATUSES = ("ok", "invalid", "failed", "invalid_input", "over_budget")

SCHEMA_TAIL = pa.schema([
    ("prompt_version", pa.string()), ("source", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("input_problem", pa.string()),
    ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("cost_usd", pa.float64()),
    ("latency_ms", pa.float64()), ("attempts", pa.int32()), ("teacher_model", pa.string()),
])


def labels_path(cfg: PipelineConfig, prompt_version: str) -> Path:
    return cfg.stage_dir(STAGE, prompt_version) / LABELS_FILE


def build_teacher_labels(cfg: PipelineConfig, prompt_version: str, db: Database, endpoint: TeacherEndpoint, *,
                         logger: logging.Logger | None = None) -> LabelRun:
    """The stage: every exported row labelled under `prompt_version`, asking `endpoint` only for what is missing."""
    from distill_pipeline.stages.prompts import load_prompts
    from distill_pipeline.stages.source_rows import read_source_rows

    prompts = load_prompts(cfg.prompts_dir)
    if prompt_version not in prompts:
        raise ValueError(f"prompt version {prompt_version} has no file in {cfg.prompts_dir} any more (edited or "
                         f"removed); current versions: {sorted(prompts)}")
    rows = read_source_rows(cfg)
    run_cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"base_url": endpoint.base_url})})
    return label_partition(run_cfg, prompts[prompt_version], rows, db, api_key=endpoint.api_key, logger=logger)


@dataclass
class LabelPlan:
    """What labelling a prompt version would do now, before anything is sent."""

    prompt_version: str
    rows: int
    reused_rows: int  # stored answers of this version (or of an identical input stored under it)
    invalid_inputs: int
    cached_inputs: int
    inputs_to_buy: int
    max_cost_usd: float  # estimated prompt tokens + max_tokens per request, at the configured prices


def plan_labels(cfg: PipelineConfig, prompt: PromptVersion, rows: pa.Table, db: Database | None) -> LabelPlan:
    """The reuse / cache / buy split of `rows` under `prompt` (the whole table, not the sample), and its cost."""
    inputs, stored_out, stored_pv = (_column(rows, c) for c in ("input", "output", "prompt_version"))
    reusable: set[str] = set()
    texts: dict[str, str] = {}
    hashes: list[str | None] = []
    invalid = 0
    for i, value in enumerate(inputs):
        text, problem, _ = check_input(value)
        if problem is not None:
            invalid += 1
            hashes.append(None)
            continue
        key = hash_input(text)
        hashes.append(key)
        if prompt.reuses(stored_pv[i]) and stored_out[i] is not None:
            reusable.add(key)
        else:
            texts.setdefault(key, text)
    wanted = [k for k in texts if k not in reusable]
    cached: dict[str, CachedLabel] = {}
    if db is not None and wanted:
        cache = LabelCache(db)
        cache.ensure()
        cached = cache.lookup(prompt.key, wanted)
    to_buy = [k for k in wanted if k not in cached or (cached[k].status == "failed" and cfg.teacher.retry_failed)]
    model = cfg.teacher.model or prompt.teacher.model
    cost = sum(price(cfg.teacher, ChatRequest(prompt.messages(texts[k]), model, prompt.teacher.max_tokens,
                                              prompt.teacher.temperature).estimated_prompt_tokens(),
                     prompt.teacher.max_tokens) for k in to_buy)
    reused_rows = sum(1 for h in hashes if h is not None and h in reusable)
    return LabelPlan(prompt.key, len(inputs), reused_rows, invalid, len(wanted) - len(to_buy), len(to_buy), cost)


def hash_input(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_hash(salt: str, row_id: Any) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{row_id}".encode()).digest()[:8], "big") >> 1


def sample_positions(cache: LabelCache, prompt_version: str, ids: list, tcfg: TeacherConfig,
                     logger: logging.Logger) -> tuple[list[int], int | None]:
    """Positions of the rows in this version's sample, and the threshold used (None: every row).

    A row is in the sample when a salted hash of its id is at most the threshold. The threshold is
    frozen in Postgres the first time the table holds more rows than `sample_size` (the sample_size-th
    smallest hash then), so later runs keep every sampled row and add only new rows below it.
    """
    size = tcfg.sample_size
    if size is None:
        return list(range(len(ids))), None
    hashes = [sample_hash(tcfg.sample_salt, i) for i in ids]
    if len(hashes) <= size:
        logger.info("sample_size=%d >= %d rows: labelling every row", size, len(hashes))
        return list(range(len(ids))), None
    proposed = int(np.partition(np.array(hashes, dtype=np.uint64), size - 1)[size - 1])
    threshold = cache.sample_threshold(prompt_version, size, tcfg.sample_salt, proposed)
    return [pos for pos, h in enumerate(hashes) if h <= threshold], threshold


def interpret(task: TaskConfig, raw: str) -> tuple[str, str, float | None, str | None]:
    """(status, output, confidence, error) of a teacher answer.

    A numeric top-level `confidence` that is not a task field is moved out of the answer into the
    confidence column (stored outputs keep confidence in its own column too).
    """
    confidence, text = None, raw
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "confidence" not in task.fields:
        value = obj.get("confidence")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            confidence = float(value)
            del obj["confidence"]
            text = json.dumps(obj, ensure_ascii=False)
    parsed = parse_output(task, text)
    if parsed.ok:
        return "ok", text, confidence, None
    return "invalid", raw, confidence, parsed.error


def price(tcfg: TeacherConfig, tokens_in: float, tokens_out: float) -> float:
    return (tokens_in * tcfg.price_per_1m_input_tokens + tokens_out * tcfg.price_per_1m_output_tokens) / 1e6


@dataclass
class RequestOutcome:
    answers: dict[str, CachedLabel] = field(default_factory=dict)
    not_sent: int = 0  # keys left when the budget ran out
    budget_reached: bool = False
    http_requests: int = 0
    retries: int = 0


async def _request_all(cfg: PipelineConfig, prompt: PromptVersion, todo: list[tuple[str, str]],
                       cache: LabelCache, api_key: str | None, logger: logging.Logger) -> RequestOutcome:
    from distill_pipeline.console import progress_bar

    tcfg, task = cfg.teacher, cfg.task
    model = tcfg.model or prompt.teacher.model
    out = RequestOutcome()
    spent = 0.0
    reserved: dict[str, float] = {}

    def may_start(key: str, request: ChatRequest) -> bool:
        # Reserve the most a request can cost (prompt estimate + max_tokens) before it starts,
        # so in-flight requests can never carry the spend past the cap.
        if tcfg.budget_usd is None:
            return True
        estimate = price(tcfg, request.estimated_prompt_tokens(), request.max_tokens)
        if spent + sum(reserved.values()) + estimate > tcfg.budget_usd:
            out.budget_reached = True
            return False
        reserved[key] = estimate
        return True

    items = ((key, ChatRequest(prompt.messages(text), model, prompt.teacher.max_tokens,
                               prompt.teacher.temperature, dict(prompt.teacher.extra))) for key, text in todo)
    bar = progress_bar(f"teacher {prompt.key}", total=len(todo), unit="req", disable=not tcfg.progress,
                       mininterval=2.0)

    def durable(labels: list[CachedLabel]) -> None:
        # An answer counts as done only once it is in the label cache.
        for label in labels:
            out.answers[label.input_hash] = label
        bar.update(len(labels))

    try:  # the bar closes after the writer's last commits, which still advance it
        async with TeacherClient.from_config(tcfg, api_key) as client, \
                CacheWriter(cache, prompt.key, capacity=client.concurrency, on_durable=durable) as writer:
            _keep_slots_until_saved(client, writer)
            try:
                async with contextlib.aclosing(map_completions(client, items, may_start=may_start)) as results:
                    async for key, done in results:
                        label = _to_label(tcfg, task, key, done)
                        reserved.pop(key, None)
                        spent += label.cost_usd or 0.0  # paid on arrival, durable or not
                        # Never waits: a background task commits it, then frees the slot its attempt held.
                        writer.add(label, done.finish_reason, holds_slot=done.ok)
            finally:
                out.http_requests, out.retries = client.attempts_sent, client.retries
    finally:
        bar.close()
    out.not_sent = len(todo) - len(out.answers)
    return out


class _AttemptSlots:
    """Stands in for the client's semaphore of `concurrency` slots, which each HTTP attempt holds: the
    slot of an attempt that brings back an answer stays taken until the writer has committed that
    answer (see CacheWriter), so attempts in flight plus unsaved answers never exceed the concurrency,
    and a kill -9 loses at most that many paid answers, even while Postgres stalls. Requests waiting
    in their retry backoff hold no slot, as before. The cost: one commit (milliseconds) per answer
    on top of the teacher's latency before its slot serves the next request."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer

    async def __aenter__(self) -> None:
        await self.writer.reserve()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:  # this attempt brought no answer (retry, error, cancel)
            self.writer.unreserve()
        return False


def _keep_slots_until_saved(client: TeacherClient, writer: CacheWriter) -> None:
    # TeacherClient takes `_slots` around each HTTP attempt only (not its backoff), which is exactly
    # what the writer must account; fail loudly rather than silently lose the bound if that changes.
    if not isinstance(getattr(client, "_slots", None), asyncio.Semaphore):
        raise RuntimeError("TeacherClient no longer has its per-attempt semaphore `_slots`: "
                           "teacher_labels cannot hold a slot until each answer is saved")
    client._slots = _AttemptSlots(writer)


def _to_label(tcfg: TeacherConfig, task: TaskConfig, key: str, done: Completion) -> CachedLabel:
    if not done.ok:
        return CachedLabel(key, "failed", None, done.error, None, None, 0.0, None, done.attempts, None)
    status, _, _, error = interpret(task, done.text)
    if done.usage_estimated:
        error = "; ".join(filter(None, [error, "token counts estimated: the endpoint reported no usage"]))
    return CachedLabel(key, status, done.text, error, done.tokens_in, done.tokens_out,
                       price(tcfg, done.tokens_in, done.tokens_out), done.latency_ms, done.attempts, done.model)


@dataclass
class LabelRun:
    path: Path
    prompt_version: str
    rows: int
    counts: dict[str, int]  # by source and by status
    run_cost_usd: float
    partition_cost_usd: float
    tokens_in: int
    tokens_out: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    http_requests: int
    retries: int
    budget_reached: bool
    not_sent: int
    lock_wait_s: float
    sample_threshold: int | None

    def metadata(self) -> dict[str, Any]:
        meta = {"path": str(self.path), "prompt_version": self.prompt_version, "rows": self.rows,
                **{k: self.counts.get(k, 0) for k in SOURCES + STATUSES},
                "run_cost_usd": round(self.run_cost_usd, 6), "partition_cost_usd": round(self.partition_cost_usd, 6),
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "http_requests": self.http_requests,
                "retries": self.retries, "budget_reached": self.budget_reached, "not_sent_over_budget": self.not_sent,
                "lock_wait_s": round(self.lock_wait_s, 3)}
        if self.latency_p50_ms is not None:
            meta["latency_p50_ms"] = round(self.latency_p50_ms, 1)
            meta["latency_p95_ms"] = round(self.latency_p95_ms, 1)
        if self.sample_threshold is not None:
            meta["sample_threshold"] = self.sample_threshold
        return meta


def _column(rows: pa.Table, name: str) -> list:
    return rows.column(name).to_pylist() if name in rows.column_names else [None] * rows.num_rows


def label_partition(cfg: PipelineConfig, prompt: PromptVersion, rows: pa.Table, db: Database, *,
                    api_key: str | None = None, logger: logging.Logger | None = None) -> LabelRun:
    """Label `rows` (the source_rows columns) under `prompt`; write and describe labels.parquet.

    `api_key`: None reads the environment variable named by teacher.api_key_env.
    """
    logger = logger or log
    tcfg, pv = cfg.teacher, prompt.key
    missing = [c for c in ("id", "input") if c not in rows.column_names]
    if missing:
        raise ValueError(f"teacher_labels: source rows lack column(s) {missing} (have {rows.column_names})")
    if prompt.task_kind and prompt.task_kind != cfg.task.kind:
        raise ValueError(f"prompt file {prompt.path} has task_kind={prompt.task_kind!r} but the config's "
                         f"task.kind is {cfg.task.kind!r}: its answers would be validated as the wrong kind")
    if api_key is None:
        api_key = os.environ.get(tcfg.api_key_env) or None
    for name in prompt.stale_stored_as:
        logger.warning("prompt file %s maps stored name %r to another fingerprint than its own (%s): the prompt "
                       "changed since those answers were made, so they are not reused for %s", prompt.path, name,
                       prompt.fingerprint, pv)

    cache = LabelCache(db)
    cache.ensure()
    ids = rows.column("id").to_pylist()
    keep, threshold = sample_positions(cache, pv, ids, tcfg, logger)
    inputs, stored_out, stored_conf, stored_pv = (_column(rows, c) for c in ("input", "output", "confidence",
                                                                             "prompt_version"))
    n = len(keep)
    col: dict[str, list] = {name: [None] * n for name in
                            ("input", "input_hash", "output", "confidence", "source", "status", "error", "input_problem",
                             "tokens_in", "tokens_out", "cost_usd", "latency_ms", "attempts", "teacher_model")}

    def put(pos: int, **values: Any) -> None:
        for name, value in values.items():
            col[name][pos] = value

    # 1-2: invalid inputs and reuse of outputs stored under this version.
    reusable: dict[str, tuple[str, float | None]] = {}
    pending: list[tuple[int, str]] = []
    texts: dict[str, str] = {}
    for pos, i in enumerate(keep):
        text, problem, detail = check_input(inputs[i])
        if problem is not None:
            put(pos, source="skipped", status="invalid_input", error=detail, input_problem=problem.value)
            continue
        key = hash_input(text)
        put(pos, input=text, input_hash=key)
        if prompt.reuses(stored_pv[i]) and stored_out[i] is not None:
            reusable.setdefault(key, (stored_out[i], stored_conf[i]))
            _put_reused(put, pos, cfg.task, stored_out[i], stored_conf[i])
        else:
            pending.append((pos, key))
            texts.setdefault(key, text)
    keys = [k for k in texts if k not in reusable]

    # 3-4: cache, then the teacher, under the partition lock (see clients/label_cache.py).
    outcome = RequestOutcome()
    with cache.partition_lock(pv, logger=logger) as lock_wait_s:
        cached = cache.lookup(pv, keys)
        todo = [(k, texts[k]) for k in keys
                if k not in cached or (cached[k].status == "failed" and tcfg.retry_failed)]
        logger.info("prompt version %s: %d rows, %d distinct inputs to label: %d cached, %d to request from %s",
                    pv, n, len(keys), len(keys) - len(todo), len(todo), tcfg.base_url)
        if todo:
            try:
                outcome = asyncio.run(_request_all(cfg, prompt, todo, cache, api_key, logger))
            except TeacherFatalError as exc:
                raise TeacherFatalError(
                    f"{exc} -- answers received so far are saved in the label cache. API key from environment "
                    f"variable {tcfg.api_key_env}: {'set' if api_key else 'not set'}") from None

    requested_now: set[str] = set()
    for pos, key in pending:
        if key in reusable:
            _put_reused(put, pos, cfg.task, *reusable[key])
            continue
        label = outcome.answers.get(key) or cached.get(key)
        if label is None:
            put(pos, source="skipped", status="over_budget",
                error=f"not sent: the run's budget of ${tcfg.budget_usd:g} (teacher.budget_usd) was reached")
            continue
        first_request = key in outcome.answers and key not in requested_now
        requested_now.add(key)
        source = "requested" if first_request else "cached"
        if label.status == "failed":
            put(pos, source=source, status="failed", error=label.error, attempts=label.attempts, cost_usd=0.0)
            continue
        status, output, confidence, error = interpret(cfg.task, label.output)
        put(pos, source=source, status=status, output=output, confidence=confidence, error=error or label.error,
            tokens_in=label.tokens_in, tokens_out=label.tokens_out, cost_usd=label.cost_usd,
            latency_ms=label.latency_ms, attempts=label.attempts, teacher_model=label.teacher_model)

    path = labels_path(cfg, pv)
    _write(path, rows, keep, pv, col)

    counts = {name: 0 for name in SOURCES + STATUSES}
    for value in col["source"] + col["status"]:
        counts[value] += 1
    bought = {**{k: v for k, v in cached.items() if k in texts}, **outcome.answers}
    latencies = [a.latency_ms for a in outcome.answers.values() if a.latency_ms is not None]
    run = LabelRun(
        path=path, prompt_version=pv, rows=n, counts=counts,
        run_cost_usd=sum(a.cost_usd or 0.0 for a in outcome.answers.values()),
        partition_cost_usd=sum(a.cost_usd or 0.0 for a in bought.values()),
        tokens_in=sum(a.tokens_in or 0 for a in outcome.answers.values()),
        tokens_out=sum(a.tokens_out or 0 for a in outcome.answers.values()),
        latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else None,
        latency_p95_ms=float(np.percentile(latencies, 95)) if latencies else None,
        http_requests=outcome.http_requests, retries=outcome.retries,
        budget_reached=outcome.budget_reached, not_sent=outcome.not_sent, lock_wait_s=lock_wait_s,
        sample_threshold=threshold,
    )
    if outcome.budget_reached:
        logger.warning("BUDGET REACHED for prompt version %s: spent $%.4f of teacher.budget_usd=$%g; %d distinct "
                       "inputs (%d rows) were not sent and are marked 'over_budget'. Everything paid for is kept "
                       "in the label cache: re-run with a larger budget to label only what is missing.",
                       pv, run.run_cost_usd, tcfg.budget_usd, outcome.not_sent, counts["over_budget"])
    logger.info("prompt version %s labelled: %s; this run cost $%.4f", pv,
                ", ".join(f"{k}={counts[k]}" for k in SOURCES + STATUSES if counts[k]), run.run_cost_usd)
    return run


def _put_reused(put, pos: int, task: TaskConfig, output: str, confidence: float | None) -> None:
    parsed = parse_output(task, output)
    put(pos, source="reused", status="ok" if parsed.ok else "invalid", output=output,
        confidence=None if confidence is None else float(confidence), error=parsed.error,
        tokens_in=0, tokens_out=0, cost_usd=0.0)


def _write(path: Path, rows: pa.Table, keep: list[int], pv: str, col: dict[str, list]) -> None:
    indices = pa.array(keep, pa.int64())
    created = (rows.column("created_at").take(indices) if "created_at" in rows.column_names
               else pa.nulls(len(keep), pa.timestamp("us", tz="UTC")))
    table = pa.table({
        "id": rows.column("id").take(indices),
        "input": pa.array(col["input"], pa.string()),
        "input_hash": pa.array(col["input_hash"], pa.string()),
        "output": pa.array(col["output"], pa.string()),
        "confidence": pa.array(col["confidence"], pa.float64()),
        "created_at": created,
        "prompt_version": pa.array([pv] * len(keep), pa.string()),
        **{f.name: pa.array(col[f.name], f.type) for f in SCHEMA_TAIL if f.name != "prompt_version"},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def read_labels(cfg: PipelineConfig, prompt_version: str, columns: list[str] | None = None) -> pa.Table:
    path = labels_path(cfg, prompt_version)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher labels for prompt version {prompt_version} at {path}: "
                                "materialize teacher_labels for that partition first")
    return pq.read_table(path, columns=columns)
