"""Task kinds: how a teacher output is parsed, validated, turned into the student's target,
and which stratum (label) it belongs to. Nothing else in the pipeline branches on the kind.

- classification: the output is a bare label or {"label": ...}; target = the label.
- extraction:     a JSON object with the configured fields, or {skip_key: true}; target = canonical JSON.
- regression:     a JSON object of numeric fields (e.g. several 0-10 scores); target = canonical JSON.
- generation:     free text; target = the stripped text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date
from typing import Any

from distill_pipeline.config import OutputField, TaskConfig

SKIP_LABEL = "skip"


@dataclass(frozen=True)
class Parsed:
    ok: bool
    target: str | None = None  # what the student learns to produce
    label: str | None = None  # stratum for splits and per-class metrics
    value: Any = None  # the parsed object / label / text
    error: str | None = None

    @staticmethod
    def fail(error: str) -> "Parsed":
        return Parsed(ok=False, error=error)


def canonical_json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _load_json(raw: str) -> tuple[Any, str | None]:
    text = raw.strip()
    if text.startswith("```"):  # teachers like fenced code blocks
        text = text.strip("`")
        text = text[text.find("\n") + 1:] if "\n" in text else text
        text = text.rsplit("```", 1)[0]
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"teacher output is not valid JSON ({exc.msg} at char {exc.pos})"


def _check_field(name: str, spec: OutputField, value: Any) -> tuple[Any, str | None]:
    if value is None:
        return (None, None) if spec.nullable else (None, f"field {name!r} is null")
    kind = spec.type
    if kind == "string" and not isinstance(value, str):
        return None, f"field {name!r} should be a string, got {type(value).__name__}"
    if kind == "boolean" and not isinstance(value, bool):
        return None, f"field {name!r} should be true/false, got {value!r}"
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, f"field {name!r} should be a number, got {value!r}"
        if kind == "integer" and float(value) != int(value):
            return None, f"field {name!r} should be an integer, got {value!r}"
        if spec.minimum is not None and value < spec.minimum:
            return None, f"field {name!r}={value} is below its minimum {spec.minimum:g}"
        if spec.maximum is not None and value > spec.maximum:
            return None, f"field {name!r}={value} is above its maximum {spec.maximum:g}"
    if kind == "date":
        try:
            date.fromisoformat(str(value))
        except ValueError:
            return None, f"field {name!r}={value!r} is not a YYYY-MM-DD date"
    if spec.enum is not None and value not in spec.enum:
        return None, f"field {name!r}={value!r} is not one of {spec.enum}"
    return value, None


def _parse_object(task: TaskConfig, raw: str) -> Parsed:
    obj, error = _load_json(raw)
    if error:
        return Parsed.fail(error)
    if not isinstance(obj, dict):
        return Parsed.fail(f"teacher output should be a JSON object, got {type(obj).__name__}")
    if task.kind == "extraction" and task.skip_key and obj.get(task.skip_key) is True:
        return Parsed(ok=True, target=canonical_json({task.skip_key: True}), label=SKIP_LABEL,
                      value={task.skip_key: True})
    clean = {}
    for name, spec in task.fields.items():  # schema order: the student always sees one layout
        if name not in obj:
            if spec.required:
                return Parsed.fail(f"teacher output is missing field {name!r}")
            if spec.nullable:
                clean[name] = None
            continue
        value, error = _check_field(name, spec, obj[name])
        if error:
            return Parsed.fail(error)
        clean[name] = value
    if task.kind == "regression":
        first = next(iter(task.fields))
        label = f"{first}={round(clean[first])}" if clean.get(first) is not None else "none"
    elif len(task.label_fields) == 1:
        label = str(clean.get(task.label_fields[0]))
    elif task.label_fields:  # the combination of several categorical fields is the stratum
        label = "|".join(f"{name}={clean.get(name)}" for name in task.label_fields)
    else:
        label = "event"
    return Parsed(ok=True, target=canonical_json(clean), label=label, value=clean)


def _parse_label(task: TaskConfig, raw: str) -> Parsed:
    text = raw.strip()
    if text.startswith("{"):
        obj, error = _load_json(text)
        if error:
            return Parsed.fail(error)
        if not isinstance(obj, dict) or "label" not in obj:
            return Parsed.fail('teacher output should be a bare label or {"label": ...}')
        text = str(obj["label"]).strip()
    text = text.strip('"').strip()
    if text not in task.labels:
        return Parsed.fail(f"label {text!r} is not one of task.labels {task.labels}")
    return Parsed(ok=True, target=text, label=text, value=text)


def parse_output(task: TaskConfig, raw: str | None) -> Parsed:
    """Parse and validate one teacher output. Never raises on bad data: returns ok=False with the reason."""
    if raw is None:
        return Parsed.fail("teacher output is NULL")
    if not isinstance(raw, str):
        return Parsed.fail(f"teacher output should be text, got {type(raw).__name__}")
    if not raw.strip():
        return Parsed.fail("teacher output is empty")
    if task.kind == "classification":
        return _parse_label(task, raw)
    if task.kind in ("extraction", "regression"):
        return _parse_object(task, raw)
    text = raw.strip()
    return Parsed(ok=True, target=text, label="all", value=text)
