"""The teacher client against the demo teacher on loopback: limits, retries, Retry-After, fatal errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from distill_pipeline.clients.teacher import (ChatRequest, TeacherClient, TeacherFatalError, TokenBucket,
                                              map_completions, parse_retry_after)
from distill_pipeline.demo.teacher_server import Faults, spawn_teacher_server, start_teacher_server

ANSWERS = {"Acme Corp. appointed Jane Doe as CFO.": {"event_type": "executive_appointment"}}


def request(text: str = "Acme Corp. appointed Jane Doe as CFO.") -> ChatRequest:
    return ChatRequest([{"role": "system", "content": "Extract events."},
                        {"role": "user", "content": f"Sentence: {text}\n"}], model="demo", max_tokens=64)


def run_all(url: str, n: int, api_key: str | None = None, **options):
    async def go():
        async with TeacherClient(url, api_key, **options) as client:
            return [done async for _, done in map_completions(client, ((i, request()) for i in range(n)))]
    return asyncio.run(go())


def test_answers_carry_text_usage_and_latency():
    with start_teacher_server(0, answers=ANSWERS, latency_s=0.0) as server:
        (done,) = run_all(server.url, 1)
    assert done.ok and done.attempts == 1 and not done.usage_estimated
    assert '"event_type": "executive_appointment"' in done.text
    assert done.tokens_in > 10 and done.tokens_out > 3 and done.latency_ms > 0 and done.model == "demo"


def test_concurrency_limit_is_kept_and_filled():
    with start_teacher_server(0, answers=ANSWERS, latency_s=0.05) as server:
        results = run_all(server.url, 40, concurrency=5)
        stats = server.stats()
    assert all(r.ok for r in results) and stats["requests"] == 40
    assert stats["peak_in_flight"] == 5


def test_retry_after_is_honoured_then_the_input_fails_with_its_error():
    faults = Faults(rate_429=1.0, retry_after_s=0.3)
    with start_teacher_server(0, answers=ANSWERS, latency_s=0.0, faults=faults) as server:
        started = time.monotonic()
        (done,) = run_all(server.url, 1, max_attempts=3, backoff_initial_s=0.01)
        elapsed = time.monotonic() - started
        assert server.stats()["requests"] == 3
    assert not done.ok and done.attempts == 3
    assert done.error.startswith("gave up after 3 attempts: HTTP 429")
    assert elapsed >= 0.6  # two waits of Retry-After, not the 10 ms backoff


def test_retry_after_formats():
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({"Retry-After": "soon"}) is None and parse_retry_after({}) is None


def test_token_bucket_spaces_requests():
    async def go():
        bucket = TokenBucket(per_minute=600, burst_s=0.1)  # 10/s, burst of 1
        started = time.monotonic()
        for _ in range(6):
            await bucket.take(1)
        return time.monotonic() - started
    assert asyncio.run(go()) >= 0.45  # 5 refills of 0.1 s after the first token


def test_token_budget_per_minute_is_applied_by_the_client():
    # tokens_per_minute=6000 with a 5 s burst holds 500 tokens; each request reserves ~20 prompt + 64 max.
    with start_teacher_server(0, answers=ANSWERS, latency_s=0.0) as server:
        started = time.monotonic()
        results = run_all(server.url, 8, tokens_per_minute=6000)
        elapsed = time.monotonic() - started
    assert all(r.ok for r in results)
    assert elapsed >= 0.8  # ~670 tokens over a 500-token bucket refilling 100 tokens/s


def test_bad_key_stops_the_run_and_is_never_shown():
    key = "sk-wrong-0123456789abcdef-DISTINCT"
    with start_teacher_server(0, answers=ANSWERS, latency_s=0.0, api_key="sk-right") as server:
        with pytest.raises(TeacherFatalError) as info:
            run_all(server.url, 20, api_key=key)
        assert server.stats()["outcomes"] == {"unauthorized": server.stats()["requests"]}
    message = str(info.value)
    assert "HTTP 401" in message and "***" in message and key not in message  # the server echoed it
    assert key not in repr(TeacherClient("http://x", key))


def test_subprocess_server_and_command_line():
    server = spawn_teacher_server(0, args=["--latency-ms", "0", "--rows", "50", "--seed", "7"])
    try:
        results = run_all(server.url, 3)
        assert all(r.ok for r in results) and server.stats()["requests"] == 3
    finally:
        server.stop()
    out = subprocess.run([sys.executable, "-m", "distill_pipeline.demo.teacher_server", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--rate-429" in out and "--latency-ms" in out
