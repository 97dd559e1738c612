"""Async client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, the demo teacher).

What a team paying per token needs from it:
- a bound on requests in flight (`concurrency`) and client-side token buckets on requests/min and
  tokens/min, so a large backfill stays under the account's limits instead of living on 429s;
- retries with exponential backoff and jitter on timeouts, connection errors, 408, 409, 429, 5xx and
  unreadable bodies, honouring Retry-After (a 429 pauses every request, not just the one that got it);
- a bounded number of attempts, after which the input is returned as failed with its last error;
- 401/403/404 stop the whole run (`TeacherFatalError`): every other request would fail the same way.

The API key goes into the Authorization header only. Error texts are built here from status codes and
body excerpts (never from aiohttp's request objects, whose repr carries the headers) and the key is
redacted from them all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Hashable, Iterable, Iterator

import aiohttp

from distill_pipeline.config import TeacherConfig
from distill_pipeline.masking import mask

RETRY_STATUSES = frozenset({408, 409, 429})
FATAL_STATUSES = frozenset({401, 403, 404})
MAX_RETRY_AFTER_S = 300.0


class TeacherFatalError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model or URL): retrying row by row is pointless."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    model: str
    max_tokens: int = 512
    temperature: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # passed through: top_p, seed, response_format, ...

    def body(self) -> dict[str, Any]:
        body = dict(self.extra)
        body.update(model=self.model, messages=self.messages, max_tokens=self.max_tokens,
                    temperature=self.temperature)
        return body

    def estimated_prompt_tokens(self) -> int:
        return estimate_tokens("".join(m.get("content") or "" for m in self.messages)) + 4 * len(self.messages)


@dataclass(frozen=True)
class Completion:
    ok: bool
    text: str | None  # the answer text when ok
    error: str | None  # the last error when not ok
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float | None = None  # of the attempt that answered
    attempts: int = 0
    model: str | None = None
    finish_reason: str | None = None
    usage_estimated: bool = False  # the endpoint sent no usage; tokens are estimates


def estimate_tokens(text: str) -> int:
    """About 4 characters per token for English; only used where the API reports nothing better."""
    return max(1, math.ceil(len(text) / 4))


class TokenBucket:
    """Allows `per_minute` units per minute with bursts up to `burst_s` seconds' worth.

    A single request larger than the burst waits for a full bucket and then goes into debt,
    so it is delayed, never refused. Waiters are served in arrival order (asyncio.Lock is FIFO).
    """

    def __init__(self, per_minute: float, burst_s: float = 5.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(ms) / 1000.0))
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - time.time()))


class _Retry(Exception):
    def __init__(self, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.error = error
        self.retry_after = retry_after


class _Final(Exception):
    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


class TeacherClient:
    """Use as `async with TeacherClient(...) as client: await client.complete(request)`."""

    def __init__(self, base_url: str, api_key: str | None = None, *, concurrency: int = 16,
                 requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 timeout_s: float = 60.0, max_attempts: int = 6, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, rng: random.Random | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key or None
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._rpm = TokenBucket(requests_per_minute) if requests_per_minute else None
        self._tpm = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self._slots: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._paused_until = 0.0
        self.attempts_sent = 0  # HTTP requests started, retries included
        self.retries = 0

    @classmethod
    def from_config(cls, cfg: TeacherConfig, api_key: str | None) -> "TeacherClient":
        return cls(cfg.base_url, api_key, concurrency=cfg.concurrency,
                   requests_per_minute=cfg.requests_per_minute, tokens_per_minute=cfg.tokens_per_minute,
                   timeout_s=cfg.timeout_s, max_attempts=cfg.max_attempts,
                   backoff_initial_s=cfg.backoff_initial_s, backoff_max_s=cfg.backoff_max_s)

    def __repr__(self) -> str:  # never show the key
        return f"TeacherClient(url={self.url!r}, concurrency={self.concurrency})"

    async def __aenter__(self) -> "TeacherClient":
        self._slots = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._session = aiohttp.ClientSession(connector=connector, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def redact(self, text: str) -> str:
        return mask(text, self._api_key) if text else text

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # "Equal jitter": between half and all of the exponential step, so retries of many
        # requests spread out yet never retry immediately.
        step = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        delay = step * (0.5 + 0.5 * self._rng.random())
        return max(delay, retry_after) if retry_after is not None else delay

    async def complete(self, request: ChatRequest) -> Completion:
        if self._session is None:
            raise RuntimeError("TeacherClient must be used inside `async with`")
        body = json.dumps(request.body(), ensure_ascii=False).encode()
        est_tokens = request.estimated_prompt_tokens() + request.max_tokens
        error = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            if self._rpm:
                await self._rpm.take(1)
            if self._tpm:
                await self._tpm.take(est_tokens)
            try:
                async with self._slots:
                    self.attempts_sent += 1
                    started = time.perf_counter()
                    result = await self._attempt(body, request)
                    latency_ms = (time.perf_counter() - started) * 1000.0
                return Completion(ok=True, latency_ms=latency_ms, attempts=attempt, **result)
            except _Final as exc:
                return Completion(ok=False, text=None, error=self.redact(exc.error), attempts=attempt)
            except _Retry as exc:
                error = self.redact(exc.error)
                if attempt == self.max_attempts:
                    break
                delay = self._backoff(attempt, exc.retry_after)
                if exc.retry_after is not None:  # the server asked everyone to slow down
                    self._paused_until = max(self._paused_until, time.monotonic() + exc.retry_after)
                self.retries += 1
                await asyncio.sleep(delay)
        return Completion(ok=False, text=None, error=f"gave up after {self.max_attempts} attempts: {error}",
                          attempts=self.max_attempts)

    async def _attempt(self, body: bytes, request: ChatRequest) -> dict[str, Any]:
        try:
            async with self._session.post(self.url, data=body) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after = parse_retry_after(resp.headers)
        except asyncio.TimeoutError:
            raise _Retry(f"timeout after {self.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise _Retry(f"connection error: {type(exc).__name__}: {exc}") from None
        snippet = raw[:300].decode("utf-8", "replace")
        if status in FATAL_STATUSES:
            raise TeacherFatalError(self.redact(f"HTTP {status} from {self.url}: {snippet}"))
        if status in RETRY_STATUSES or status >= 500:
            raise _Retry(f"HTTP {status}: {snippet}", retry_after)
        if status != 200:
            raise _Final(f"HTTP {status}: {snippet}")
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            # Truncated or non-JSON bodies come from proxies and dropped connections: retry.
            raise _Retry(f"unreadable response body (HTTP 200, {len(raw)} bytes): {snippet[:120]!r}") from None
        text = message.get("content") if isinstance(message, dict) else None
        finish = choice.get("finish_reason")
        if not isinstance(text, str):
            raise _Final(f"answer has no text content (finish_reason={finish})")
        usage = data.get("usage") or {}
        tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        estimated = not isinstance(tokens_in, int) or not isinstance(tokens_out, int)
        if estimated:
            tokens_in, tokens_out = request.estimated_prompt_tokens(), estimate_tokens(text)
        return dict(text=text, error=None, tokens_in=tokens_in, tokens_out=tokens_out,
                    model=data.get("model"), finish_reason=finish, usage_estimated=estimated)


async def map_completions(client: TeacherClient, items: Iterable[tuple[Hashable, ChatRequest]], *,
                          may_start: Callable[[Hashable, ChatRequest], bool] | None = None,
                          window: int | None = None) -> AsyncIterator[tuple[Hashable, Completion]]:
    """Run requests with at most `window` started at once; yield (key, completion) as they finish.

    The window is larger than the concurrency so that requests sleeping in backoff do not leave
    connection slots idle. `may_start` is asked before each start; once it says no, nothing more
    is started (what is in flight still finishes). A TeacherFatalError cancels the rest and propagates.
    """
    window = window or client.concurrency * 2
    it = iter(items)
    pending: dict[asyncio.Task, Hashable] = {}
    stopped = False
    try:
        while True:
            while not stopped and len(pending) < window:
                nxt = next(it, None)
                if nxt is None or (may_start is not None and not may_start(*nxt)):
                    stopped = True
                    break
                key, request = nxt
                pending[asyncio.ensure_future(client.complete(request))] = key
            if not pending:
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                key = pending.pop(task)
                yield key, task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


# --- the teacher a labelling run talks to: the real endpoint, or the demo's stand-in ----------------


@dataclass(frozen=True)
class TeacherEndpoint:
    """Where one labelling run sends its requests."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    description: str = ""  # for metadata and logs: never the key


class Teacher(ABC):
    """Opens the teacher endpoint for the length of one labelling run."""

    @abstractmethod
    def open(self, cfg: TeacherConfig) -> contextlib.AbstractContextManager[TeacherEndpoint]: ...


class OpenAICompatibleTeacher(Teacher):
    """The team's endpoint at teacher.base_url; the key given, else the variable named by teacher.api_key_env."""

    def __init__(self, api_key: str | None = None):
        self.api_key = api_key

    @contextlib.contextmanager
    def open(self, cfg: TeacherConfig) -> Iterator[TeacherEndpoint]:
        yield TeacherEndpoint(cfg.base_url, self.api_key or os.environ.get(cfg.api_key_env) or None, cfg.base_url)


class DemoTeacher(Teacher):
    """The demo's stand-in teacher (answers from the demo data), on a free loopback port for this run only,
    so concurrent runs never share or stop each other's server."""

    def __init__(self, rows: int | None = None, seed: int = 7):
        self.rows = rows
        self.seed = seed

    @contextlib.contextmanager
    def open(self, cfg: TeacherConfig) -> Iterator[TeacherEndpoint]:
        from distill_pipeline.demo.teacher_server import DEMO_ROWS, start_teacher_server

        handle = start_teacher_server(0, rows=self.rows or DEMO_ROWS, seed=self.seed)
        try:
            yield TeacherEndpoint(handle.url, None, "demo teacher (started for this run)")
        finally:
            handle.stop()
