"""Teacher prompt versions: one YAML file per prompt in the configured folder.

A version's key is `<slug>-<hash8>`: the file's stem made comma-free plus the
first 8 hex digits of the SHA-256 of its canonical content, so any edit to the
rubric, template, model or sampling makes a new key (a new Dagster partition)
while comments and key order do not.

Answers the team already has: `stored_as` maps the names the table's prompt-version
column uses (`rubric-2026-09`) to the fingerprint of the prompt those answers were made
with (the hash of the file without `stored_as`; `distill prompts` prints it). Stored rows
under such a name are reused for this version only while the fingerprint matches: edit
the rubric (or copy the file into a new version) and the old answers are no longer taken
for its answers -- `distill prompts` then says so -- until the mapping is updated.
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
    fingerprint: str = ""  # hash8 of the file without stored_as: what a stored_as entry is bound to
    stored_as: tuple[str, ...] = ()  # stored prompt-version names whose answers are this version's
    stale_stored_as: tuple[str, ...] = ()  # declared for another fingerprint: not reused

    def reuses(self, stored_name: str | None) -> bool:
        """Whether a stored row under `stored_name` holds this version's answer."""
        return stored_name is not None and (stored_name == self.key or stored_name in self.stored_as)

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
    allowed = {"system", "user_template", "teacher", "task_kind", "output_schema", "stored_as"}
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
    digest = _sha256(data)
    fingerprint = _sha256({k: v for k, v in data.items() if k != "stored_as"})[:8]
    stored = _stored_as(path, data.get("stored_as"), fingerprint)
    return PromptVersion(
        key=f"{slugify(path.stem)}-{digest[:8]}",
        path=path,
        task_kind=str(data.get("task_kind", "")),
        system=str(data.get("system") or ""),
        user_template=template,
        teacher=settings,
        content_hash=digest,
        fingerprint=fingerprint,
        stored_as=tuple(name for name, bound in stored.items() if bound == fingerprint),
        stale_stored_as=tuple(name for name, bound in stored.items() if bound != fingerprint),
    )


def _sha256(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _stored_as(path: Path, value: Any, fingerprint: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        pasted = ", ".join(f"{name}: {fingerprint}" for name in value)
        raise PromptError(f"{path}: stored_as must bind each stored name to the fingerprint of the prompt its answers "
                          f"were made with, e.g. `stored_as: {{{pasted}}}` ({fingerprint} is this file's fingerprint "
                          "now: write it only if the stored answers came from exactly this prompt)")
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise PromptError(f"{path}: stored_as must be a mapping {{stored prompt-version name: fingerprint}}")
    bad = [k for k, v in value.items() if not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}", v))]
    if bad:
        raise PromptError(f"{path}: stored_as.{bad[0]}: expected an 8-digit hex fingerprint "
                          f"(this file's is {fingerprint})")
    return dict(value)


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


def _natural_order(name: str) -> list:
    # "v10" after "v9": digit runs compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def active_versions(versions: dict[str, PromptVersion], wanted: tuple[str, ...] | list[str]) -> list[str]:
    """Keys of the prompt versions the nightly rebuild refreshes (setting nightly.active_prompt_versions).

    Each wanted name is a prompt file's name without suffix or a full key; none -> the newest file only.
    """
    by_file = sorted(versions.values(), key=lambda v: _natural_order(v.path.stem))
    if not by_file:
        return []
    if not wanted:
        return [by_file[-1].key]
    keys = []
    for name in wanted:
        match = [v.key for v in by_file if name in (v.key, v.path.stem, slugify(v.path.stem))]
        if not match:
            raise PromptError(f"nightly.active_prompt_versions: {name!r} is no prompt file in {by_file[0].path.parent} "
                              f"(the files: {', '.join(v.path.stem for v in by_file)})")
        keys.extend(k for k in match if k not in keys)
    return keys
