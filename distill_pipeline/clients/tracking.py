"""Experiment tracking behind one small interface.

Training code calls a `Tracker` unconditionally; `NullTracker` does nothing, so
no training code ever branches on "is logging on".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Protocol

from distill_pipeline.distributed import is_main_process
from distill_pipeline.masking import is_secret_name, mask_url


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None: ...



class NullTracker:
    """The do-nothing tracker: every call is accepted and dropped."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None:
        pass



# --- MLflow -----------------------------------------------------------------------------------
# mlflow is imported inside functions only: this module is loaded with the Dagster definitions.

# MLflow's own tag names, so the MLflow UI shows them in its usual places.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# Dataset digests are stored in a 36-character column.
_MLFLOW_DIGEST_LEN = 32
_PARAM_VALUE_MAX = 6000
def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params fit for MLflow: credentials dropped, URL passwords masked, values as bounded strings.

    A key that names a credential (password, token, api key, ...) is dropped whatever its
    value; a key that merely names *where* a credential lives (e.g. `teacher.api_key_env`)
    is kept, since its value is an environment variable name, not the key.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value") or (is_secret_name(key) and not key.endswith("_env")):
            continue
        text = json.dumps(value, default=str, sort_keys=True) if isinstance(value, (list, tuple, dict)) else str(value)
        text = mask_url(text)
        out[key[:250]] = text[:_PARAM_VALUE_MAX]
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class MlflowTracker:
    """A `Tracker` writing into one existing MLflow run (created by the Dagster side).

    It never ends the run: the process that created it sets the final status.
    """

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def connect(cls, tracking_uri: str, run_id: str) -> "MlflowTracker":
        return cls(mlflow_client(tracking_uri), run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in safe_params(params).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, path: Path, name: str, digest: str, context: str) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        path = Path(path).resolve()
        schema, profile = _parquet_schema_profile(path)
        profile["sha256"] = digest
        dataset = Dataset(
            name=name,
            digest=digest[:_MLFLOW_DIGEST_LEN],
            source_type="local",
            source=json.dumps({"uri": path.as_uri()}),
            schema=schema,
            profile=json.dumps(profile),
        )
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])


def _parquet_schema_profile(path: Path) -> tuple[str | None, dict[str, Any]]:
    """MLflow dataset schema (column names and types) and row count of a Parquet file."""
    if path.suffix != ".parquet" or not path.is_file():
        return None, {}
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    arrow_schema = meta.schema.to_arrow_schema()
    cols = [{"name": f.name, "type": str(f.type)} for f in arrow_schema]
    return json.dumps({"mlflow_colspec": cols}), {"num_rows": meta.num_rows}


def tracker_from_env(env: Mapping[str, str] | None = None) -> Tracker:
    """The worker's tracker: MLflow when MLFLOW_TRACKING_URI and MLFLOW_RUN_ID are set, else nothing.

    Under `accelerate launch` only the process of global rank 0 logs.
    """
    env = os.environ if env is None else env
    uri, run_id = env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_RUN_ID")
    if not uri or not run_id or not is_main_process(env):
        return NullTracker()
    return MlflowTracker.connect(uri, run_id)


def default_tracking_uri(home: Path) -> str:
    return "sqlite:///" + str((Path(home) / "mlflow" / "mlflow.db").resolve())


def resolve_tracking_uri(cfg: Any, env: Mapping[str, str] | None = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store under <home>/mlflow."""
    env = os.environ if env is None else env
    return cfg.tracking.uri or env.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.home)


def is_local_uri(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def mlflow_client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created (with its artifact root) when missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created by a concurrent run in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def experiment_artifact_location(cfg: Any, tracking_uri: str) -> str | None:
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if is_local_uri(tracking_uri):
        # Without this MLflow would put artifacts in ./mlruns of whatever directory we run in.
        return (Path(cfg.home).resolve() / "mlflow" / "artifacts").as_uri()
    return None


def git_commit(repo_dir: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the code runs from; $DISTILL_GIT_COMMIT in images without .git."""
    if os.environ.get("DISTILL_GIT_COMMIT"):
        return os.environ["DISTILL_GIT_COMMIT"], None
    cwd = str(repo_dir or Path(__file__).resolve().parent.parent.parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=30
        )
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def run_link(ui_url: str | None, tracking_uri: str, experiment_id: str, run_id: str) -> str:
    base = ui_url or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    return f"{mask_url(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_run(
    client: Any,
    experiment_id: str,
    *,
    run_name: str,
    tags: Mapping[str, str | None],
    params: Mapping[str, Any],
) -> str:
    """Create a RUNNING MLflow run with its tags and (secret-free) params; returns the run id."""
    clean_tags = {k: mask_url(str(v)) for k, v in tags.items() if v is not None}
    run = client.create_run(experiment_id, run_name=run_name, tags=clean_tags)
    MlflowTracker(client, run.info.run_id).log_params(params)
    return run.info.run_id


def finish_run(client: Any, run_id: str, ok: bool) -> None:
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


class TrackedRun(MlflowTracker):
    """The MLflow run of one materialization, as the stage that owns it sees it."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, tracking_uri: str, link: str):
        super().__init__(client, run_id)
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.link = link

    def worker_env(self) -> dict[str, str]:
        """What a worker process needs to log into this run (`tracker_from_env`)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_RUN_ID": self.run_id,
                "MLFLOW_EXPERIMENT_ID": self.experiment_id}

    def log_text(self, text: str, artifact_path: str, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(path, artifact_path)

    def has_artifacts(self, artifact_path: str) -> bool:
        return bool(self.client.list_artifacts(self.run_id, artifact_path))


class ExperimentStore:
    """An MLflow store and experiment: one tracked run per materialization of a stage.

    `run()` is the whole lifecycle: create the run with its tags and (secret-free) params, hand it to
    the stage, and close it FINISHED when the stage returns or FAILED when it raises.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None,
                 ui_url: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.ui_url = ui_url

    @classmethod
    def from_config(cls, cfg: Any, tracking_uri: str | None = None, experiment: str | None = None) -> "ExperimentStore":
        uri = tracking_uri or resolve_tracking_uri(cfg)
        return cls(uri, experiment or cfg.tracking.experiment, experiment_artifact_location(cfg, uri),
                   cfg.tracking.ui_url)

    @contextmanager
    def run(self, run_name: str, tags: Mapping[str, str | None], params: Mapping[str, Any]) -> Iterator[TrackedRun]:
        client = mlflow_client(self.tracking_uri)
        experiment_id = ensure_experiment(client, self.experiment, self.artifact_location)
        run_id = start_run(client, experiment_id, run_name=run_name, tags=tags, params=params)
        run = TrackedRun(client, run_id, experiment_id, self.tracking_uri,
                         run_link(self.ui_url, self.tracking_uri, experiment_id, run_id))
        ok = False
        try:
            yield run
            ok = True
        finally:
            finish_run(client, run_id, ok)


class ModelRegistry:
    """The MLflow model registry: adapters that passed the eval gate are versions of one registered model,
    and the best of them carries the alias `champion`."""

    CHAMPION = "champion"

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri

    def _client(self) -> Any:
        return mlflow_client(self.tracking_uri)

    def champion(self, name: str) -> dict[str, Any] | None:
        """{version, run_id, headline_value, ...tags} of the champion, None when there is none yet."""
        from mlflow.exceptions import MlflowException

        try:
            version = self._client().get_model_version_by_alias(name, self.CHAMPION)
        except MlflowException:  # no such model or alias yet
            return None
        return {"version": str(version.version), "run_id": version.run_id, **dict(version.tags or {})}

    def register(self, name: str, run_id: str, artifact_path: str, tags: Mapping[str, Any]) -> str:
        """A new version from the run's artifact folder (MLflow 3: `runs:/` resolves only to logged models)."""
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            client.create_registered_model(name)
        except MlflowException:  # exists already (or was created by a concurrent run)
            pass
        run = client.get_run(run_id)
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                                              tags={k: str(v) for k, v in tags.items() if v is not None})
        return str(version.version)

    def version_of_run(self, name: str, run_id: str) -> str | None:
        """The newest registered version made from `run_id`, None when the run's adapter was never registered."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self._client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        except MlflowException:
            return None
        return str(max(int(v.version) for v in versions)) if versions else None

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self._client().get_model_version(name, version).tags or {})

    def tag_version(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        client = self._client()
        for key, value in tags.items():
            if value is not None:
                client.set_model_version_tag(name, version, key, str(value))

    def make_champion(self, name: str, version: str) -> None:
        self._client().set_registered_model_alias(name, self.CHAMPION, version)

    def log_to_run(self, run_id: str, folder: Path, artifact_path: str, metrics: Mapping[str, float]) -> None:
        """The eval report and its figures on the (finished) MLflow run of the adapter it evaluated."""
        tracker = MlflowTracker(self._client(), run_id)
        tracker.log_artifact(folder, artifact_path)
        tracker.log_metrics(metrics)
