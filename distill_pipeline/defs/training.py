"""`student_adapter`: LoRA training launched through the compute resource, traced in MLflow.

The asset creates the MLflow run (tags, params, dataset inputs), starts the worker
(`distill_pipeline.workers.train`) locally or in a Kubernetes pod with MLFLOW_RUN_ID in
its environment, logs the adapter, closes the run and returns the worker's metadata
plus the run id and link. Training itself happens only in the worker process. When the
adapter in place was trained from identical inputs, it is reported again instead
(`stages/adapter_record.py`; `train.retrain_unchanged` forces training).
"""


import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from distill_pipeline import __version__
from distill_pipeline.clients import tracking
from distill_pipeline.clients.compute import ComputeClient, TrainJob, compute_client, pod_config_yaml, public_config
from distill_pipeline.config import DEFAULT_CONFIG_FILE, PipelineConfig
from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import SettingsResource
from distill_pipeline.stages import adapter_record

# Config sections that say nothing about how the student was trained (or hold endpoints).
_NOT_TRAINING = {"home", "prompts_dir", "database", "source", "teacher", "curate", "compute", "tracking"}
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ComputeResource(dg.ConfigurableResource):
    """Where training runs. `backend` overrides compute.backend of the pipeline config."""

    settings: SettingsResource
    backend: str | None = None

    def client(self, tracking_uri: str | None = None) -> ComputeClient:
        return compute_client(self.settings.load(), backend=self.backend, tracking_uri=tracking_uri)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking: URI and experiment (None -> tracking.* of the pipeline config)."""

    settings: SettingsResource
    tracking_uri: str | None = None
    experiment: str | None = None

    def uri(self) -> str:
        return self.tracking_uri or tracking.resolve_tracking_uri(self.settings.load())

    def experiment_name(self) -> str:
        return self.experiment or self.settings.load().tracking.experiment

    def client(self) -> Any:
        """An `mlflow.MlflowClient` on the configured store."""
        return tracking.mlflow_client(self.uri())

    def experiment_id(self, client: Any) -> str:
        cfg = self.settings.load()
        location = tracking.experiment_artifact_location(cfg, self.uri())
        return tracking.ensure_experiment(client, self.experiment_name(), location)


def config_file_of(settings: SettingsResource) -> Path:
    """The YAML the settings resource loaded; the local worker loads the same file."""
    return Path(settings.config_file or os.environ.get("DISTILL_CONFIG") or DEFAULT_CONFIG_FILE).resolve()


def split_digests(splits_dir: Path) -> dict[str, dict[str, Any]]:
    """{split: {rows, sha256, path}} from the dataset_splits manifest, checked against the files."""
    manifest_path = splits_dir / "manifest.json"
    if not manifest_path.is_file():
        raise dg.Failure(
            f"no dataset splits at {splits_dir} (manifest.json missing): materialize dataset_splits "
            "for this partition first"
        )
    splits = json.loads(manifest_path.read_text()).get("splits", {})
    out = {}
    for name in ("train", "val"):
        path = splits_dir / f"{name}.parquet"
        if not path.is_file():
            raise dg.Failure(f"dataset_splits is incomplete: {path} is missing")
        info = splits.get(name, {})
        out[name] = {"rows": info.get("rows"), "sha256": info.get("sha256") or tracking.file_sha256(path), "path": path}
    return out


def training_params(cfg: PipelineConfig, prompt_version: str, data: dict[str, dict[str, Any]],
                    compute: dict[str, Any]) -> dict[str, Any]:
    """MLflow params: the training-relevant config, data digests and compute settings (no secrets)."""
    public = tracking.flatten(public_config(cfg, exclude=_NOT_TRAINING))
    params: dict[str, Any] = {"prompt_version": prompt_version, **public}
    for name, info in data.items():
        params[f"data.{name}.sha256"] = info["sha256"]
        params[f"data.{name}.rows"] = info["rows"]
    params.update({f"compute.{k}": v for k, v in compute.items()})
    return tracking.safe_params(params)


def find_adapter_dir(output_dir: Path) -> Path | None:
    for candidate in (output_dir / "adapter", output_dir):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _worker_result(invocation: Any) -> tuple[dict[str, Any], Any]:
    """Metadata and data version the worker reported for this asset through Pipes."""
    metadata: dict[str, Any] = {}
    data_version = None
    for result in invocation.get_results():
        if isinstance(result, dg.MaterializeResult):
            metadata.update(result.metadata or {})
            data_version = result.data_version or data_version
    return metadata, data_version


@dg.asset(
    group_name="training",
    kinds={"pytorch", "mlflow"},
    partitions_def=prompt_versions,
    deps=[dg.AssetKey("dataset_splits")],
    pool="gpu",
    description="LoRA adapter of the student on this prompt version's splits, trained in its own process "
                "(local or a Kubernetes GPU pod); one MLflow run per materialization.",
)
def student_adapter(
    context: dg.AssetExecutionContext,
    settings: SettingsResource,
    compute: ComputeResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    cfg = settings.load()
    pv = context.partition_key
    splits_dir = cfg.stage_dir("dataset_splits", pv)
    output_dir = cfg.stage_dir("student_adapter", pv)
    data = split_digests(splits_dir)

    uri = mlflow.uri()
    runner = compute.client(tracking_uri=uri)
    compute_settings = runner.describe()
    commit, dirty = tracking.git_commit()
    params = training_params(cfg, pv, data, compute_settings)
    key = adapter_record.training_key(params, __version__, commit)
    in_place = find_adapter_dir(output_dir)
    record = None if cfg.train.retrain_unchanged else adapter_record.reusable(output_dir, in_place, key)
    if record is not None:
        context.log.info(f"inputs unchanged since MLflow run {record['mlflow_run_id']}: reporting its adapter "
                         "again without training (train.retrain_unchanged: true forces training)")
        return _reused(record, in_place, data, compute_settings)
    adapter_record.forget(output_dir)

    client = mlflow.client()
    experiment_id = mlflow.experiment_id(client)
    run_id = tracking.start_run(
        client,
        experiment_id,
        run_name=f"{pv}-{context.run_id[:8]}",
        tags={
            "dagster.run_id": context.run_id,
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": pv,
            tracking.TAG_GIT_COMMIT: commit,
            "distill.git_dirty": None if dirty is None else str(dirty).lower(),
            "distill.compute_backend": runner.backend,
        },
        params=params,
    )
    link = tracking.run_link(cfg.tracking.ui_url, uri, experiment_id, run_id)
    context.log.info(f"MLflow run {run_id}: {link}")
    tracker = tracking.MlflowTracker(client, run_id)
    ok = False
    try:
        for name, context_tag in (("train", "training"), ("val", "validation")):
            tracker.log_dataset(data[name]["path"], f"{pv}/{name}", data[name]["sha256"], context_tag)
        _log_text(tracker, pod_config_yaml(cfg), "config", "pipeline.yaml")

        job = TrainJob(
            cfg=cfg,
            config_file=config_file_of(settings),
            prompt_version=pv,
            splits_dir=splits_dir,
            output_dir=output_dir,
            env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": experiment_id},
        )
        invocation = runner.run(context, job, extras={"mlflow_run_id": run_id, "prompt_version": pv})
        worker_metadata, data_version = _worker_result(invocation)

        adapter_dir = find_adapter_dir(output_dir)
        if adapter_dir is None:
            raise dg.Failure(f"the worker finished but left no adapter (adapter_config.json) under {output_dir}")
        if not client.list_artifacts(run_id, "adapter"):
            for name in _ADAPTER_FILES:
                if (adapter_dir / name).is_file():
                    tracker.log_artifact(adapter_dir / name, "adapter")
        adapter_sha = tracking.file_sha256(adapter_dir / adapter_record.ADAPTER_WEIGHTS)
        ok = True
    finally:
        tracking.finish_run(client, run_id, ok)
    adapter_record.write_record(output_dir, key, adapter_sha, run_id, link,
                                {**{k: _plain(v) for k, v in worker_metadata.items()},
                                 "mlflow_experiment_id": experiment_id})

    return dg.MaterializeResult(
        metadata={
            **worker_metadata,
            "reused": False,
            "mlflow_run_id": run_id,
            "mlflow_run": dg.MetadataValue.url(link),
            "mlflow_experiment_id": experiment_id,
            "adapter_path": dg.MetadataValue.path(str(adapter_dir)),
            "train_sha256": data["train"]["sha256"][:16],
            "val_sha256": data["val"]["sha256"][:16],
            "compute": dg.MetadataValue.json(compute_settings),
        },
        data_version=data_version,
    )


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


def _reused(record: dict[str, Any], adapter_dir: Path, data: dict[str, dict[str, Any]],
            compute: dict[str, Any]) -> dg.MaterializeResult:
    """The materialization of an adapter kept because its inputs did not change."""
    kept = {}
    for k, v in record["metadata"].items():
        if k in ("adapter_path", "mlflow_run") or v is None:
            continue
        kept[k] = dg.MetadataValue.md(v) if k == "samples" else dg.MetadataValue.json(v) \
            if isinstance(v, (dict, list)) else v
    return dg.MaterializeResult(
        metadata={
            **kept,
            "reused": True,
            "mlflow_run_id": record["mlflow_run_id"],
            "mlflow_run": dg.MetadataValue.url(record["mlflow_run"]),
            "adapter_path": dg.MetadataValue.path(str(adapter_dir)),
            "adapter_sha256": record["adapter_sha256"],
            "train_sha256": data["train"]["sha256"][:16],
            "val_sha256": data["val"]["sha256"][:16],
            "compute": dg.MetadataValue.json(compute),
        },
        data_version=dg.DataVersion(record["adapter_sha256"][:16]),
    )


def _log_text(tracker: tracking.MlflowTracker, text: str, artifact_path: str, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        tracker.log_artifact(path, artifact_path)


defs = dg.Definitions(assets=[student_adapter])
