"""The one configuration of the pipeline: a YAML file, then environment overrides.

The same `PipelineConfig` object drives the CLI, the Dagster assets and the
training subprocess. Unknown keys are errors, so a typo never silently falls
back to a default.

Environment overrides (applied after the file):
  DISTILL_HOME                 -> home
  DATABASE_URL                 -> database.url
  DISTILL__SECTION__KEY=value  -> section.key (value parsed as YAML: numbers, lists, ...)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_FILE = Path(__file__).parent / "demo" / "demo.yaml"
ENV_PREFIX = "DISTILL__"

# Postgres identifiers we accept from config: plain names only, so a table or
# column setting can never smuggle SQL into a query.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the key and where it came from."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_identifier(value: str, key: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ValueError(
            f"{key}={value!r} is not a plain SQL identifier "
            "(letters, digits, _ and $, starting with a letter or _, at most 63 chars)"
        )
    return value


class DatabaseConfig(Section):
    # None -> the embedded PostgreSQL (pgserver) under `home/pgdata`.
    url: SecretStr | None = None
    # Schema holding the pipeline's own tables (label cache, ...).
    schema_name: str = "distill"

    @field_validator("schema_name")
    @classmethod
    def _schema_ident(cls, v: str) -> str:
        return check_identifier(v, "database.schema_name")


class SourceColumns(Section):
    """Where each field lives in the team's table. Only `id`, `input` and `created_at` are required."""

    id: str = "id"
    input: str = "input_text"
    output: str | None = "teacher_output"
    confidence: str | None = "confidence"
    prompt_version: str | None = "prompt_version"
    created_at: str = "created_at"

    @model_validator(mode="after")
    def _idents(self) -> "SourceColumns":
        for name, value in self.model_dump().items():
            if value is not None:
                check_identifier(value, f"source.columns.{name}")
        return self


class SourceConfig(Section):
    table: str = "teacher_outputs"  # `table` or `schema.table`
    columns: SourceColumns = SourceColumns()
    # Filters applied in the export query (rows they exclude never enter the pipeline).
    min_confidence: float | None = None
    prompt_versions: list[str] | None = None
    # Re-read this many seconds before the watermark, so rows committed late with
    # an earlier created_at are still picked up; the re-read is idempotent.
    overlap_seconds: int = Field(3600, ge=0)
    # Rows per Parquet shard inside one day bucket, and per Arrow batch read.
    shard_rows: int = Field(250_000, ge=1000)
    batch_rows: int = Field(65_536, ge=1024)

    @field_validator("table")
    @classmethod
    def _table_ident(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) > 2:
            raise ValueError(f"source.table={v!r}: expected `table` or `schema.table`")
        for part in parts:
            check_identifier(part, "source.table")
        return v


FieldType = Literal["string", "integer", "number", "boolean", "date"]


class OutputField(Section):
    type: FieldType = "string"
    enum: list[Any] | None = None
    required: bool = True
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None


class TaskConfig(Section):
    """What the teacher produces and so what the student learns.

    The kind picks output parsing, validation, the stratification key and the
    metrics; nothing else in the pipeline branches on it.
    """

    kind: Literal["classification", "extraction", "regression", "generation"] = "extraction"
    # extraction / regression: the JSON object's fields.
    fields: dict[str, OutputField] = {}
    # extraction: an output that is exactly {skip_key: true} is a valid "nothing here" answer.
    skip_key: str | None = "skip"
    # extraction: field used to stratify splits (skip examples form their own stratum).
    label_field: str | None = None
    # classification: the allowed labels; the output is the bare label or {"label": ...}.
    labels: list[str] = []
    # Optional short instruction shown to the student before the raw input.
    instruction: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        if self.kind in ("extraction", "regression") and not self.fields:
            raise ValueError(f"task.fields: a {self.kind} task needs at least one output field")
        if self.kind == "classification" and not self.labels:
            raise ValueError("task.labels: a classification task needs its list of labels")
        if self.label_field is not None and self.label_field not in self.fields:
            raise ValueError(f"task.label_field={self.label_field!r} is not one of task.fields")
        if self.kind == "regression":
            bad = [k for k, f in self.fields.items() if f.type not in ("number", "integer")]
            if bad:
                raise ValueError(f"task.fields: regression fields must be numeric, not {bad}")
        return self


class CurateConfig(Section):
    min_confidence: float | None = 7.0
    min_input_chars: int = Field(1, ge=1)
    max_input_chars: int = Field(4000, ge=1)
    max_output_chars: int = Field(8000, ge=1)
    # Share of letters that must be Latin script; None disables the language filter.
    min_latin_letter_ratio: float | None = Field(0.6, ge=0, le=1)
    # Near-duplicate detection: MinHash over character n-grams of the normalized input.
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)
    shingle_size: int = Field(3, ge=1, le=8)
    num_perm: int = Field(128, ge=16, le=512)
    lsh_bands: int = Field(16, ge=1)
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _bands(self) -> "CurateConfig":
        if self.num_perm % self.lsh_bands:
            raise ValueError(f"curate.lsh_bands={self.lsh_bands} must divide curate.num_perm={self.num_perm}")
        if self.min_input_chars > self.max_input_chars:
            raise ValueError("curate.min_input_chars is larger than curate.max_input_chars")
        return self


class SplitConfig(Section):
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    # Changing the salt reshuffles every split; keep it fixed for sticky splits.
    salt: str = "distill-v1"
    # Asset check: each split's label shares may differ from the whole by at most this much.
    max_label_share_gap: float = Field(0.05, gt=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1, got {total:g}")
        return self


class PipelineConfig(Section):
    home: Path = Path(".distill")
    prompts_dir: Path = Path("prompts")
    database: DatabaseConfig = DatabaseConfig()
    source: SourceConfig = SourceConfig()
    task: TaskConfig = TaskConfig(kind="generation")
    curate: CurateConfig = CurateConfig()
    split: SplitConfig = SplitConfig()

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    def stage_dir(self, stage: str, partition: str | None = None) -> Path:
        path = self.artifacts_dir / stage
        return path / partition if partition else path


def _set_path(data: dict, dotted: list[str], value: Any) -> None:
    node = data
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(dotted)}: {part} is not a section")
    node[dotted[-1]] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, tuple[list[str], Any, str]]:
    out: dict[str, tuple[list[str], Any, str]] = {}
    if env.get("DISTILL_HOME"):
        out["home"] = (["home"], env["DISTILL_HOME"], "DISTILL_HOME")
    if env.get("DATABASE_URL"):
        out["database.url"] = (["database", "url"], env["DATABASE_URL"], "DATABASE_URL")
    for name, raw in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError:
                value = raw
            out[".".join(dotted)] = (dotted, value, name)
    return out


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Load the YAML config at `path` (default: $DISTILL_CONFIG, else the shipped demo config).

    Relative paths inside the file (home, prompts_dir) are resolved against the
    current directory for `home` (so DISTILL_HOME=./.distill means the checkout)
    and against the file's folder for `prompts_dir`.
    """
    env = os.environ if env is None else env
    path = Path(path or env.get("DISTILL_CONFIG") or DEFAULT_CONFIG_FILE)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (set DISTILL_CONFIG or pass --config)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")

    sources = {}
    for key, (dotted, value, var) in _env_overrides(env).items():
        _set_path(data, dotted, value)
        sources[key] = f"environment variable {var}"

    prompts_dir = Path(data.get("prompts_dir", "prompts"))
    if not prompts_dir.is_absolute() and "prompts_dir" not in sources:
        data["prompts_dir"] = str((path.parent / prompts_dir).resolve())

    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
            origin = next((src for k, src in sources.items() if key == k or key.startswith(k + ".")), str(path))
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key or '(top level)'}: {msg} (from {origin})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
