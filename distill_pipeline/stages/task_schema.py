"""The JSON Schema of a task's answers, derived from the task config alone.

One schema, three uses: the curated targets are validated against it by an independent validator
(`jsonschema`), the student is constrained to it when decoding, and it ships with the model for
serving. It is written from the config, not from `tasks.parse_output`, so a bug in the parser shows
up as targets that fail the schema.
"""

from __future__ import annotations

from typing import Any

from distill_pipeline.config import OutputField, TaskConfig

_JSON_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "date": "string"}


def _field_schema(spec: OutputField) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": [_JSON_TYPES[spec.type], "null"] if spec.nullable else _JSON_TYPES[spec.type]}
    if spec.type == "date":
        schema["format"] = "date"
    if spec.enum is not None:
        schema["enum"] = list(spec.enum) + ([None] if spec.nullable and None not in spec.enum else [])
    if spec.minimum is not None:
        schema["minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    return schema


def answer_schema(task: TaskConfig) -> dict[str, Any]:
    """The schema one answer (as JSON) must satisfy. Classification answers are the bare label, a JSON string."""
    if task.kind == "classification":
        return {"type": "string", "enum": list(task.labels)}
    if task.kind == "generation":
        return {"type": "string", "minLength": 1}
    event = {
        "type": "object",
        "properties": {name: _field_schema(spec) for name, spec in task.fields.items()},
        "required": [name for name, spec in task.fields.items() if spec.required],
        "additionalProperties": False,
    }
    if task.kind == "extraction" and task.skip_key:
        skip = {"type": "object", "properties": {task.skip_key: {"const": True}}, "required": [task.skip_key],
                "additionalProperties": False}
        return {"anyOf": [skip, event]}
    return event
