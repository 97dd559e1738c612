"""Teacher prompt versions: one YAML file per prompt in the configured folder.

A version's key is `<slug>-<hash8>`: the file's stem made comma-free plus the
first 8 hex digits of the SHA-256 of its canonical content, so any edit to the
rubric, template, model or sampling makes a new key (a new Dagster partition)
while comments and key order do not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROMPT_SUFFIXES = (".yaml", ".yml")
KEY_PATTERN = re.compile(r"^[a-z0-9_-]+$")


class PromptError(ValueError):
    """A prompt file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class TeacherSettings:
    model: str
    temperature: float = 0.0
    max_tokens: int = 512
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptVersion:
    key: str
    path: Path
    task_kind: str
    system: str
    user_template: str
    teacher: TeacherSettings
    content_hash: str

    def render_user(self, input_text: str) -> str:
        # str.replace, not str.format: inputs and rubrics are full of braces (JSON).
        return self.user_template.replace("{input}", input_text)

    def messages(self, input_text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return msgs + [{"role": "user", "content": self.render_user(input_text)}]


def slugify(stem: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-")
    if not slug:
        raise PromptError(f"cannot make a partition key from file name {stem!r}")
    return slug


def load_prompt(path: Path) -> PromptVersion:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PromptError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping with system, user_template, teacher, task_kind")
    allowed = {"system", "user_template", "teacher", "task_kind", "output_schema"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PromptError(f"{path}: unknown keys {unknown} (allowed: {sorted(allowed)})")
    template = data.get("user_template")
    if not isinstance(template, str) or "{input}" not in template:
        raise PromptError(f"{path}: user_template must be a string containing {{input}}")
    teacher = data.get("teacher") or {}
    if not isinstance(teacher, dict) or not isinstance(teacher.get("model"), str):
        raise PromptError(f"{path}: teacher.model (the teacher model name) is required")
    known = {"model", "temperature", "max_tokens"}
    settings = TeacherSettings(
        model=teacher["model"],
        temperature=float(teacher.get("temperature", 0.0)),
        max_tokens=int(teacher.get("max_tokens", 512)),
        extra={k: v for k, v in teacher.items() if k not in known},
    )
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return PromptVersion(
        key=f"{slugify(path.stem)}-{digest[:8]}",
        path=path,
        task_kind=str(data.get("task_kind", "")),
        system=str(data.get("system") or ""),
        user_template=template,
        teacher=settings,
        content_hash=digest,
    )


def load_prompts(folder: Path) -> dict[str, PromptVersion]:
    """All prompt versions in `folder`, by key."""
    if not folder.is_dir():
        raise PromptError(f"prompts folder {folder} does not exist (setting prompts_dir)")
    versions: dict[str, PromptVersion] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in PROMPT_SUFFIXES and path.is_file():
            version = load_prompt(path)
            versions[version.key] = version
    return versions
