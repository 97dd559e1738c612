"""`distill serve`: the student's GGUF behind the teacher's API (OpenAI chat completions) on loopback.

A client that called the teacher calls the student by changing its base URL. Two things differ from the
teacher, and the server takes care of both:
- The student was trained on the raw input alone (no rubric). A request carrying the teacher's prompt
  (its system rubric, its user template around the input) is reduced to the raw input: the user template
  of the prompt version is matched and its `{input}` taken; otherwise the last user message is the input.
- The answer is held to the task's grammar, the same llguidance grammar text the eval report decoded
  under (llama.cpp is built with llguidance), unless the request brings its own `response_format` or
  `grammar`. Greedy decoding by default, as evaluated.

llama.cpp runs in this process (`xllamacpp.Server`); this module adds a small HTTP front (stdlib
`ThreadingHTTPServer`) for /v1/chat/completions, /v1/models and /health.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from distill_pipeline.stages.formatting import user_message


def template_pattern(user_template: str) -> re.Pattern[str]:
    """A regex that finds `{input}` in a user message rendered from `user_template`."""
    before, _, after = user_template.strip().partition("{input}")
    return re.compile(re.escape(before) + r"(?P<input>.*)" + re.escape(after) + r"\Z", re.DOTALL)


def raw_input_of(messages: list[dict[str, Any]], pattern: re.Pattern[str] | None) -> str:
    """The raw input in an OpenAI-style message list (the teacher's prompt stripped), or ValueError."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("the request has no user message")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts: the text ones, in order
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the last user message has no text")
    text = content.strip()
    if pattern is not None:
        found = pattern.match(text)
        if found and found.group("input").strip():
            return found.group("input").strip()
    return text


@dataclass
class StudentModel:
    """One GGUF loaded in llama.cpp, answering like the evaluated student."""

    gguf_path: Path
    grammar: str | None  # the task grammar, None for free text
    instruction: str | None = None
    user_pattern: re.Pattern[str] | None = None
    name: str = "distill-student"
    context: int = 2048
    max_tokens: int = 256
    threads: int | None = None

    def __post_init__(self) -> None:
        import os

        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(self.gguf_path)
        params.n_ctx = self.context
        params.n_parallel = 1
        params.warmup = False
        params.verbosity = -1  # llama.cpp logs every slot and timing otherwise
        threads = self.threads or max(1, min(os.cpu_count() or 1, 8))
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        self._server = xllamacpp.Server(params)
        self._lock = threading.Lock()  # one slot: requests take turns

    def request_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request as llama.cpp gets it: raw input, the student's chat format, the task grammar."""
        raw = raw_input_of(body.get("messages") or [], self.user_pattern)
        out = {key: value for key, value in body.items() if key not in ("messages", "model", "stream")}
        out["messages"] = [{"role": "user", "content": user_message(raw, self.instruction)}]
        out.setdefault("temperature", 0.0)
        out.setdefault("max_tokens", self.max_tokens)
        if self.grammar and not any(k in body for k in ("response_format", "grammar", "json_schema")):
            out["grammar"] = self.grammar
        return out

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self.request_body(body)
        with self._lock:
            response = self._server.handle_chat_completions(request)
        if isinstance(response, dict) and "error" in response:
            raise RuntimeError(f"llama.cpp: {response['error']}")
        response["model"] = self.name
        return response


class _Handler(BaseHTTPRequestHandler):
    student: StudentModel  # set on the subclass made by `make_server`

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request on stderr would drown the caller's own output

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error" if status < 500
                                      else "server_error"}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.rstrip("/")
        if path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": self.student.name, "object": "model",
                                                          "created": int(time.time()), "owned_by": "distill"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}; the student answers POST /v1/chat/completions")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except json.JSONDecodeError as exc:
            self._error(400, f"the request body is not JSON: {exc}")
            return
        if not isinstance(body, dict):
            self._error(400, "the request body must be a JSON object")
            return
        if body.get("stream"):
            self._error(400, "stream=true is not served; ask without streaming")
            return
        try:
            self._send(200, self.student.chat(body))
        except ValueError as exc:
            self._error(400, str(exc))
        except RuntimeError as exc:
            self._error(500, str(exc))


def make_server(student: StudentModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for `student` (port 0: a free one; `server.server_address` says which)."""
    handler = type("StudentHandler", (_Handler,), {"student": student})
    return ThreadingHTTPServer((host, port), handler)
