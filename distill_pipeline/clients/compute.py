"""Where training runs: a local subprocess or a Kubernetes GPU pod, both through Dagster Pipes.

Both backends start the same entry point, `python -m distill_pipeline.workers.train`
(under `accelerate launch` for several processes), with the MLflow run id in its
environment. dagster, dagster_k8s and kubernetes are imported inside functions only.

On Kubernetes the pod gets:
- the pipeline config as YAML in $DISTILL_CONFIG_YAML (secret fields and the database
  section left out), written to a file by `python -m distill_pipeline.workers.pod`,
  which then starts the worker exactly as the local backend does;
- DISTILL_HOME on shared storage: a PVC holding the same home the Dagster side uses, or
  local scratch synced with an object store (`object_store_root`) before and after;
- credentials only as `valueFrom.secretKeyRef`: the spec never holds a secret value.

`build_pod_spec` is a pure function: what it returns is what the cluster receives
(plus the Pipes bootstrap variables), so it is tested without a cluster.
"""

from __future__ import annotations

import socket
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from distill_pipeline.clients.object_store import object_uri, pull_dir, push_dir
from distill_pipeline.config import KubernetesComputeConfig, LocalComputeConfig, PipelineConfig
from distill_pipeline.masking import looks_secret

WORKER_MODULE = "distill_pipeline.workers.train"
POD_MODULE = "distill_pipeline.workers.pod"
CONFIG_YAML_ENV = "DISTILL_CONFIG_YAML"
CONTAINER_NAME = "train"
HOME_VOLUME = "distill-home"


@dataclass(frozen=True)
class WorkerJob:
    """One run of a worker process (training, evaluation), in the Dagster side's terms (paths under cfg.home)."""

    cfg: PipelineConfig
    config_file: Path  # the YAML the Dagster side loaded (the local worker reads the same file)
    prompt_version: str
    splits_dir: Path
    output_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)  # MLFLOW_TRACKING_URI, MLFLOW_RUN_ID, ...
    module: str | None = None  # the worker's module; None -> the training worker
    num_processes: int | None = None  # None -> the backend's (compute.local.num_processes / one per GPU)
    input_dirs: tuple[Path, ...] = ()  # other folders the worker reads (staged to the pod like splits_dir)


def worker_command(
    *,
    python: str,
    num_processes: int,
    config_file: str,
    prompt_version: str,
    splits_dir: str,
    output_dir: str,
    port: int | None = None,
    module: str = WORKER_MODULE,
) -> list[str]:
    """The worker's command line: plain python for one process, `accelerate launch` for several.

    `accelerate launch --cpu` runs a single process whatever --num_processes says; several
    processes on CPU need the multi-process launcher plus ACCELERATE_USE_CPU=true (gloo),
    which `worker_env` sets.
    """
    args = [
        "-m", module,
        "--config", config_file,
        "--prompt-version", prompt_version,
        "--splits-dir", splits_dir,
        "--output-dir", output_dir,
    ]
    if num_processes <= 1:
        return [python, *args]
    launch = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--num_processes", str(num_processes)]
    if port is not None:
        launch += ["--main_process_port", str(port)]
    return [*launch, *args]


def worker_env(use_cpu: bool) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def free_port() -> int:
    """A free TCP port for the rendezvous of one local multi-process run (runs may overlap)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComputeClient(ABC):
    """Starts the training worker for one `WorkerJob` inside a Pipes session."""

    backend: str

    @abstractmethod
    def run(self, context: Any, job: WorkerJob, extras: Mapping[str, Any] | None = None) -> Any:
        """Run the worker to completion; returns the Pipes `PipesClientCompletedInvocation`."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain settings for metadata and MLflow params (never a secret)."""


@dataclass
class WorkerReport:
    """What the worker reported through Pipes: its materialization metadata, as plain values."""

    metadata: dict[str, Any]


class BoundCompute:
    """A compute client bound to the Dagster context of one materialization: what a stage calls."""

    def __init__(self, client: ComputeClient, context: Any):
        self.client = client
        self.context = context
        self.backend = client.backend

    def describe(self) -> dict[str, Any]:
        return self.client.describe()

    def run(self, job: WorkerJob) -> WorkerReport:
        invocation = self.client.run(self.context, job, extras={"mlflow_run_id": job.env.get("MLFLOW_RUN_ID"),
                                                                "prompt_version": job.prompt_version})
        metadata: dict[str, Any] = {}
        for result in invocation.get_results():
            metadata.update({k: getattr(v, "value", v) for k, v in (getattr(result, "metadata", None) or {}).items()})
        return WorkerReport(metadata)


class LocalCompute(ComputeClient):
    """The worker as a subprocess of the Dagster run (Pipes subprocess client)."""

    backend = "local"

    def __init__(self, cfg: LocalComputeConfig, python: str | None = None, cwd: str | None = None,
                 module: str = WORKER_MODULE):
        self.cfg = cfg
        self.python = python or sys.executable
        self.cwd = cwd
        self.module = module

    def command(self, job: WorkerJob) -> list[str]:
        return worker_command(
            python=self.python,
            num_processes=job.num_processes or self.cfg.num_processes,
            config_file=str(Path(job.config_file).resolve()),
            prompt_version=job.prompt_version,
            splits_dir=str(Path(job.splits_dir).resolve()),
            output_dir=str(Path(job.output_dir).resolve()),
            port=free_port() if (job.num_processes or self.cfg.num_processes) > 1 else None,
            module=job.module or self.module,
        )

    def environment(self, job: WorkerJob) -> dict[str, str]:
        # The subprocess also inherits the Dagster process's environment (DISTILL_HOME, DATABASE_URL, ...).
        return {**worker_env(self.cfg.use_cpu), **self.cfg.env, **job.env}

    def run(self, context: Any, job: WorkerJob, extras: Mapping[str, Any] | None = None) -> Any:
        from dagster import PipesSubprocessClient

        client = PipesSubprocessClient(cwd=self.cwd, termination_timeout_seconds=60)
        return client.run(context=context, command=self.command(job), env=self.environment(job), extras=dict(extras or {}))

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "num_processes": self.cfg.num_processes, "use_cpu": self.cfg.use_cpu}


# --- Kubernetes -----------------------------------------------------------------------------


def pod_config_yaml(cfg: PipelineConfig) -> str:
    """The config for the pod: everything but the database section and secret-typed fields."""
    return yaml.safe_dump(public_config(cfg, exclude={"database"}), sort_keys=False)


def public_config(model: Any, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """A config model as plain data, without secret-typed fields and without the `exclude` sections."""
    from pydantic import BaseModel, SecretStr

    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        if name in exclude:
            continue
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            continue
        if isinstance(value, BaseModel):
            out[name] = public_config(value)
        else:
            out[name] = model.model_dump(mode="json", include={name})[name]
    return out


def _label_value(value: str) -> str:
    """Kubernetes label values: at most 63 chars of [A-Za-z0-9-_.], alphanumeric at both ends."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in value)[:63]
    return cleaned.strip("-_.") or "none"


class KubernetesCompute(ComputeClient):
    """The worker in a pod on a GPU cluster (dagster-k8s `PipesK8sClient`)."""

    backend = "kubernetes"

    def __init__(self, cfg: KubernetesComputeConfig, tracking_uri: str | None = None):
        self.cfg = cfg
        self.tracking_uri = cfg.tracking_uri or tracking_uri

    # Paths as the pod sees them.
    def pod_home(self) -> PurePosixPath:
        if self.cfg.object_store_root:
            return PurePosixPath(self.cfg.scratch_path) / "home"
        return PurePosixPath(self.cfg.mount_path)

    def pod_path(self, job: WorkerJob, local: Path) -> PurePosixPath:
        home = Path(job.cfg.home).resolve()
        try:
            rel = Path(local).resolve().relative_to(home)
        except ValueError:
            raise ValueError(
                f"{local} is not under the pipeline home {home}; on Kubernetes every artifact "
                "must live under home, which the pod sees on shared storage"
            ) from None
        return self.pod_home() / PurePosixPath(*rel.parts)

    def _env(self, job: WorkerJob) -> list[dict[str, Any]]:
        if self.tracking_uri is None and "MLFLOW_TRACKING_URI" not in self.cfg.secret_env:
            raise ValueError("no MLflow tracking URI for the pod: set tracking.uri or compute.kubernetes.tracking_uri")
        if "MLFLOW_TRACKING_URI" not in self.cfg.secret_env:
            from distill_pipeline.clients.tracking import is_local_uri

            if is_local_uri(self.tracking_uri):
                raise ValueError(
                    f"the pod cannot reach the local MLflow store {self.tracking_uri}: set "
                    "compute.kubernetes.tracking_uri to the MLflow server URL the cluster can reach"
                )
        plain: dict[str, str] = {
            **worker_env(self.cfg.gpus == 0),
            "DISTILL_HOME": str(self.pod_home()),
            CONFIG_YAML_ENV: pod_config_yaml(job.cfg),
            "HF_HOME": str(self.pod_home() / "hf-cache"),
            # converted base models on the shared volume, not in the container's ephemeral ~/.cache
            "DISTILL_MODEL_CACHE": str(self.pod_home() / "base_models"),
            **self.cfg.env,
            **{k: v for k, v in job.env.items() if k not in self.cfg.secret_env},
        }
        if "MLFLOW_TRACKING_URI" not in self.cfg.secret_env:
            plain["MLFLOW_TRACKING_URI"] = self.tracking_uri
        for name, value in plain.items():
            # job.env comes from code, not config: refuse a credential there too.
            if looks_secret(name, value):
                raise ValueError(
                    f"environment variable {name} for the pod looks like a credential; "
                    f"give it through compute.kubernetes.secret_env.{name} (a Kubernetes Secret)"
                )
        env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in plain.items()]
        env += [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
            for name, ref in sorted(self.cfg.secret_env.items())
        ]
        return env

    def command(self, job: WorkerJob) -> list[str]:
        """The container command: the pod wrapper, which starts the worker like the local backend."""
        cmd = [
            "python", "-m", POD_MODULE,
            "--prompt-version", job.prompt_version,
            "--splits-dir", str(self.pod_path(job, job.splits_dir)),
            "--output-dir", str(self.pod_path(job, job.output_dir)),
            "--num-processes", str(job.num_processes or max(1, self.cfg.gpus)),
        ]
        if job.module:
            cmd += ["--module", job.module]
        for folder in job.input_dirs:
            cmd += ["--input-dir", str(self.pod_path(job, folder))]
        if self.cfg.gpus == 0:
            cmd.append("--cpu")
        if self.cfg.object_store_root:
            cmd += ["--object-store-root", self.cfg.object_store_root, "--home", str(self.pod_home())]
        return cmd

    def build_pod_spec(self, job: WorkerJob) -> tuple[dict[str, Any], dict[str, Any]]:
        """(pod metadata, pod spec) in the API's camelCase, exactly as sent (Pipes adds its env vars)."""
        k8s = self.cfg
        resources: dict[str, dict[str, str]] = {"limits": {}, "requests": {}}
        if k8s.gpus:
            resources["limits"]["nvidia.com/gpu"] = str(k8s.gpus)
        for key, value in (("cpu", k8s.cpu), ("memory", k8s.memory)):
            if value:
                resources["limits"][key] = resources["requests"][key] = value
        resources = {k: v for k, v in resources.items() if v}

        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        if k8s.pvc_claim:
            volumes.append({"name": HOME_VOLUME, "persistentVolumeClaim": {"claimName": k8s.pvc_claim}})
            mount = {"name": HOME_VOLUME, "mountPath": k8s.mount_path}
            if k8s.pvc_sub_path:
                mount["subPath"] = k8s.pvc_sub_path
            mounts.append(mount)
        if k8s.object_store_root:
            volumes.append({"name": "scratch", "emptyDir": {}})
            mounts.append({"name": "scratch", "mountPath": k8s.scratch_path})
        if k8s.shm_size:
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}})
            mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

        container: dict[str, Any] = {
            "name": CONTAINER_NAME,
            "image": k8s.image,
            "imagePullPolicy": k8s.image_pull_policy,
            "command": self.command(job),
            "env": self._env(job),
        }
        if resources:
            container["resources"] = resources
        if mounts:
            container["volumeMounts"] = mounts

        spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
        if k8s.service_account:
            spec["serviceAccountName"] = k8s.service_account
        if k8s.node_selector:
            spec["nodeSelector"] = dict(k8s.node_selector)
        if k8s.tolerations:
            spec["tolerations"] = [dict(t) for t in k8s.tolerations]
        if k8s.image_pull_secrets:
            spec["imagePullSecrets"] = [{"name": name} for name in k8s.image_pull_secrets]
        if volumes:
            spec["volumes"] = volumes

        labels = {
            "app.kubernetes.io/name": "distill-train",
            "app.kubernetes.io/component": "student-adapter",
            "distill/prompt-version": _label_value(job.prompt_version),
            **{k: _label_value(v) for k, v in k8s.labels.items()},
        }
        if job.env.get("MLFLOW_RUN_ID"):
            labels["distill/mlflow-run-id"] = _label_value(job.env["MLFLOW_RUN_ID"])
        meta: dict[str, Any] = {"labels": labels}
        if k8s.annotations:
            meta["annotations"] = dict(k8s.annotations)
        return meta, spec

    def message_reader(self, job: WorkerJob, run_id: str) -> Any:
        if self.cfg.message_reader == "logs":
            from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

            return PipesK8sPodLogsMessageReader()
        name = f"{run_id}-{_label_value(job.prompt_version)}.jsonl"
        local = Path(job.cfg.home).resolve() / "pipes" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        return shared_file_message_reader(str(local), str(self.pod_home() / "pipes" / name))

    def run(self, context: Any, job: WorkerJob, extras: Mapping[str, Any] | None = None) -> Any:
        from dagster_k8s import PipesK8sClient

        meta, spec = self.build_pod_spec(job)
        if self.cfg.object_store_root:
            for folder in (job.splits_dir, *job.input_dirs):
                push_dir(folder, object_uri(self.cfg.object_store_root, job.cfg.home, folder))
        client = PipesK8sClient(
            message_reader=self.message_reader(job, context.run_id),
            load_incluster_config=self.cfg.load_incluster_config,
            kubeconfig_file=self.cfg.kubeconfig_file,
            kube_context=self.cfg.kube_context,
            poll_interval=self.cfg.poll_interval_s,
        )
        invocation = client.run(
            context=context,
            extras=dict(extras or {}),
            namespace=self.cfg.namespace,
            base_pod_meta=meta,
            base_pod_spec=spec,
            pod_wait_timeout=self.cfg.pod_wait_timeout_s,
            delete_pod_on_completion=self.cfg.delete_pod_on_completion,
        )
        if self.cfg.object_store_root:
            pull_dir(object_uri(self.cfg.object_store_root, job.cfg.home, job.output_dir), job.output_dir)
        return invocation

    def describe(self) -> dict[str, Any]:
        k8s = self.cfg
        return {
            "backend": "kubernetes",
            "image": k8s.image,
            "namespace": k8s.namespace,
            "gpus": k8s.gpus,
            "storage": f"pvc:{k8s.pvc_claim}" if k8s.pvc_claim else f"object:{k8s.object_store_root}",
            "message_reader": k8s.message_reader,
        }


def shared_file_message_reader(local_path: str, pod_path: str) -> Any:
    """A Pipes reader tailing a file on the shared volume; the pod writes it under its own mount path.

    Unlike the pod log stream it does not break on multi-hour runs.
    """
    from dagster import PipesFileMessageReader
    from dagster_pipes import PipesDefaultMessageWriter

    class SharedFileMessageReader(PipesFileMessageReader):
        @contextmanager
        def read_messages(self, handler):  # type: ignore[override]
            with super().read_messages(handler) as params:
                yield {**params, PipesDefaultMessageWriter.FILE_PATH_KEY: pod_path}

    return SharedFileMessageReader(local_path)


def compute_client(cfg: PipelineConfig, backend: str | None = None, tracking_uri: str | None = None) -> ComputeClient:
    from pydantic import ValidationError

    from distill_pipeline.config import ComputeConfig, ConfigError

    backend = backend or cfg.compute.backend
    if backend not in ("local", "kubernetes"):
        raise ConfigError(f"compute backend {backend!r}: expected local or kubernetes")
    try:  # an override of the backend gets the same checks as compute.backend in the file
        compute = ComputeConfig.model_validate({**cfg.compute.model_dump(), "backend": backend})
    except ValidationError as exc:
        raise ConfigError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    if backend == "local":
        return LocalCompute(compute.local)
    return KubernetesCompute(compute.kubernetes, tracking_uri=tracking_uri)
