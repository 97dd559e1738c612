"""The demo teacher: a local OpenAI-compatible chat-completions server answering the demo task.

It knows the clean answer of every sentence of `demo.data.generate_rows(rows, seed)` and answers
`{"skip": true}` for any other sentence, so the backfill of a new prompt version can be watched
without an API key. It also misbehaves on demand, like a real API under load: 429 with Retry-After,
500, hangs past the client's timeout, truncated or non-JSON bodies, and answers that are not valid
JSON, each at a configurable rate. It counts every request (GET /stats) so tests can check who was asked,
and every complete answer it delivered, per input (`answered`: what a real API would have billed).

    python -m distill_pipeline.demo.teacher_server --port 8911 --latency-ms 50 --rate-429 0.05

From Python: `start_teacher_server(port=0, ...)` runs it in a background thread,
`spawn_teacher_server(...)` in a subprocess (own CPU, for benchmarks); both return a handle with
`.url` (the base URL to configure), `.stats()`, `.reset()` and `.stop()`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from distill_pipeline.demo.data import generate_rows

if TYPE_CHECKING:
    pass

DEFAULT_PORT = 8911
# Sentences of generate_rows(n, seed) are the first n of generate_rows(DEMO_ROWS, seed): answers for
# DEMO_ROWS rows cover every demo table of that seed up to that size.
DEMO_ROWS = 20_000
DEFAULT_TEMPLATE = "Sentence: {input}"
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Faults:
    """Share of requests answered with each fault (drawn independently per request, sum <= 1)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0  # hang for hang_s before answering (longer than the client's timeout)
    rate_truncated: float = 0.0  # HTTP 200 whose JSON body is cut in half
    rate_nonjson: float = 0.0  # HTTP 200 with an HTML error page
    rate_bad_answer: float = 0.0  # a well-formed response whose answer text is broken JSON
    retry_after_s: float = 1.0
    hang_s: float = 30.0

    def __post_init__(self):
        rates = [getattr(self, f.name) for f in fields(self) if f.name.startswith("rate_")]
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {rates}")

    def draw(self, rng: random.Random) -> str | None:
        roll = rng.random()
        for f in fields(self):
            if f.name.startswith("rate_"):
                roll -= getattr(self, f.name)
                if roll < 0:
                    return f.name.removeprefix("rate_")
        return None


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def demo_answers(rows: int = DEMO_ROWS, seed: int = 7) -> dict[str, dict]:
    """sentence (stripped) -> the answer a perfect teacher gives, for the demo table of (rows, seed)."""
    answers = {}
    for row in generate_rows(rows, seed):
        if row.sentence is not None and row.sentence.strip():
            answers.setdefault(row.sentence.strip(), row.answer)
    return answers


class DemoTeacher:
    def __init__(self, answers: dict[str, dict], *, latency_s: float = 0.05, faults: Faults = Faults(),
                 fault_seed: int = 0, confidence: float | None = 9.0, api_key: str | None = None,
                 template: str = DEFAULT_TEMPLATE, model: str = "demo-teacher"):
        self.answers = answers
        self.latency_s = latency_s
        self.faults = faults
        self.confidence = confidence
        self.model = model
        self._api_key = api_key
        self._rng = random.Random(fault_seed)
        head, _, tail = template.partition("{input}")
        self._head, self._tail = head.strip(), tail.strip()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.peak_in_flight = self.in_flight  # requests still running stay counted in flight
        self.outcomes: Counter = Counter()
        self.sentences: Counter = Counter()
        self.answered: Counter = Counter()

    def snapshot(self) -> dict:
        return {"requests": self.requests, "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight,
                "outcomes": dict(self.outcomes), "sentences": dict(self.sentences), "answered": dict(self.answered)}

    def sentence_of(self, messages: list) -> str:
        """The input inside the last user message, with the prompt template's text around it removed."""
        users = [m.get("content") or "" for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = (users[-1] if users else "").strip()
        if self._head and text.startswith(self._head):
            text = text[len(self._head):]
        if self._tail and text.endswith(self._tail):
            text = text[: -len(self._tail)]
        return text.strip()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_view)
        app.router.add_post("/reset", self.reset_view)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            response, outcome, sentence = await self._respond(request)
            if outcome == "timeout":  # counted now: the client is gone before the answer comes
                self.outcomes[outcome] += 1
                await asyncio.sleep(self.faults.hang_s)
            # The configured latency runs from arrival to answer, our own work included, so the
            # server adds nothing on top of it (it must never be the bottleneck of a benchmark).
            await asyncio.sleep(max(0.0, self.latency_s - (time.monotonic() - arrived)))
            if outcome != "timeout":
                self.outcomes[outcome] += 1
            if outcome in ("ok", "bad_answer"):
                # A complete answer is counted as delivered only once written to a live connection:
                # answers finished after the client died (killed mid-request) reach nobody.
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionResetError:
                    return response
                self.answered[sentence] += 1
            return response
        finally:
            self.in_flight -= 1

    async def _respond(self, request: web.Request) -> tuple[web.Response, str, str | None]:
        """The response to send, its outcome name (a fault, or ok) and the input asked about."""
        sent = request.headers.get("Authorization", "")
        if self._api_key and sent != f"Bearer {self._api_key}":
            # Echoes the key like some real APIs do, so tests can check the client never logs it.
            return _error(401, f"Incorrect API key provided: {sent.removeprefix('Bearer ')}"), "unauthorized", None
        try:
            body = await request.json()
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "body must be JSON with a messages list"), "bad_request", None
        sentence = self.sentence_of(messages)
        self.sentences[sentence] += 1
        fault = self.faults.draw(self._rng)
        if fault == "429":
            wait = self.faults.retry_after_s
            headers = {"Retry-After": f"{wait:g}", "retry-after-ms": str(int(wait * 1000))}
            return _error(429, "rate limit reached, retry later", headers), fault, sentence
        if fault == "500":
            return _error(500, "internal server error"), fault, sentence
        if fault == "nonjson":
            return web.Response(text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                content_type="text/html"), fault, sentence
        answer = dict(self.answers.get(sentence, {"skip": True}))
        if self.confidence is not None:
            answer["confidence"] = self.confidence
        content = json.dumps(answer, ensure_ascii=False)
        if fault == "bad_answer":
            content = content[: max(1, len(content) // 2)]
        prompt_tokens = sum(count_tokens(str(m.get("content") or "")) + 4 for m in messages if isinstance(m, dict))
        completion_tokens = count_tokens(content)
        payload = json.dumps({
            "id": f"chatcmpl-demo-{self.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": str(body.get("model") or self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, ensure_ascii=False)
        if fault == "truncated":
            payload = payload[: len(payload) // 2]
        return web.Response(text=payload, content_type="application/json"), fault or "ok", sentence


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "error"}}, status=status, headers=headers)


class TeacherServerHandle:
    def __init__(self, port: int, stop: Callable[[], None], host: str = "127.0.0.1"):
        self.port = port
        self.base = f"http://{host}:{port}"
        self.url = self.base + "/v1"
        self._stop = stop

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base + "/stats", timeout=30) as resp:
            return json.loads(resp.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.base + "/reset", method="POST"), timeout=30).close()

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> "TeacherServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_teacher_server(port: int = 0, host: str = "127.0.0.1", *, rows: int = DEMO_ROWS, seed: int = 7,
                         answers: dict[str, dict] | None = None, **options) -> TeacherServerHandle:
    """Run the demo teacher in a background thread of this process; port 0 picks a free port.

    `options` are DemoTeacher's: latency_s, faults=Faults(...), fault_seed, confidence, api_key, template.
    """
    teacher = DemoTeacher(answers if answers is not None else demo_answers(rows, seed), **options)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            runner = web.AppRunner(teacher.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, port, backlog=1024)
            loop.run_until_complete(site.start())
            state["runner"] = runner
            state["port"] = runner.addresses[0][1]
        except BaseException as exc:  # reported to the caller below
            state["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.close()

    async def shutdown() -> None:
        await state["runner"].cleanup()
        # Handlers still sleeping (hang faults) would outlive the loop: cancel them.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    thread = threading.Thread(target=run, name="demo-teacher", daemon=True)
    thread.start()
    ready.wait(60)
    if "error" in state:
        raise RuntimeError(f"demo teacher could not listen on {host}:{port}: {state['error']}")

    def stop() -> None:
        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)

    return TeacherServerHandle(state["port"], stop, host)


def spawn_teacher_server(port: int = 0, host: str = "127.0.0.1", *, args: list[str] = (),
                         env: dict | None = None) -> TeacherServerHandle:
    """Run the demo teacher in its own process (`args`: extra command-line options)."""
    cmd = [sys.executable, "-m", "distill_pipeline.demo.teacher_server", "--host", host, "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    line = proc.stdout.readline()  # the server prints "listening on http://host:port/v1" when ready
    match = re.search(r":(\d+)/v1", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"demo teacher did not start (exit code {proc.wait()}): {line!r}")

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()

    return TeacherServerHandle(int(match.group(1)), stop, host)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--rows", type=int, default=DEMO_ROWS, help="demo table size the answers come from")
    p.add_argument("--seed", type=int, default=7, help="demo table seed the answers come from")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--confidence", type=float, default=9.0, help="added to each answer; negative: none")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="the prompts' user template, to find the input")
    p.add_argument("--require-key-env", default=None,
                   help="answer 401 unless the Bearer key equals this environment variable's value")
    p.add_argument("--fault-seed", type=int, default=0)
    for f in fields(Faults):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=f.default)
    a = p.parse_args(argv)
    faults = Faults(**{f.name: getattr(a, f.name) for f in fields(Faults)})
    api_key = None
    if a.require_key_env:
        api_key = os.environ.get(a.require_key_env)
        if not api_key:
            p.error(f"--require-key-env {a.require_key_env}: that environment variable is not set")
    answers = demo_answers(a.rows, a.seed)
    handle = start_teacher_server(a.port, a.host, answers=answers, latency_s=a.latency_ms / 1000.0,
                                  faults=faults, fault_seed=a.fault_seed, api_key=api_key, template=a.template,
                                  confidence=a.confidence if a.confidence >= 0 else None)
    # spawn_teacher_server waits for this line.
    print(f"demo teacher listening on {handle.url} ({len(answers)} known sentences)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        handle.stop()


if __name__ == "__main__":
    main()
