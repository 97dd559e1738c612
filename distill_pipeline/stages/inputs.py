"""What makes a source input unusable, decided once: teacher_labels never sends such an input, and
curated_examples quarantines it under the same reason code."""

from __future__ import annotations

from enum import Enum
from typing import Any


class InputProblem(str, Enum):
    NULL = "input_null"
    NOT_UTF8 = "input_not_utf8"
    NOT_TEXT = "input_not_text"
    EMPTY = "input_empty"


def check_input(value: Any) -> tuple[str | None, InputProblem | None, str | None]:
    """(text, None, None) for a usable input; (None, problem, detail) for one that must never be sent."""
    if value is None:
        return None, InputProblem.NULL, "input is NULL"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, InputProblem.NOT_UTF8, f"byte {exc.start}: {raw[exc.start:exc.start + 4]!r} is not valid UTF-8"
    if not isinstance(value, str):
        return None, InputProblem.NOT_TEXT, f"input should be text, got {type(value).__name__}"
    if not value.strip():
        return None, InputProblem.EMPTY, "input is empty"
    return value, None, None
