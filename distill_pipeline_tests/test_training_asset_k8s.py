"""`student_adapter` with compute.backend=kubernetes, end to end against a fake cluster.

The Kubernetes API is the only fake (test_compute_k8s.FakeKubernetes): it records the pod and
runs the pod's own command with the pod's own environment, as a kubelet would. So the real
pod wrapper writes the shipped config, the real worker trains a tiny model on the "PVC"
(mounted at the home's path), logs into the MLflow run the asset created (its URI reaches
the pod through a Secret reference) and reports over the shared-volume Pipes message file.
"""

import json

import dagster as dg
import pyarrow as pa
import yaml

from distill_pipeline.clients import tracking
from distill_pipeline.config import load_config
from distill_pipeline.defs.resources import SettingsResource
from distill_pipeline.defs.assets import student_adapter
from distill_pipeline.defs.resources import ComputeResource, MlflowResource
from distill_pipeline.stages import dataset_splits
from distill_pipeline_tests.test_compute_k8s import FakeKubernetes
from distill_pipeline_tests.train_support import (  # noqa: F401
    demo_split_rows,
    demo_tokenizer_dir,
    tiny_models,
    write_config,
)

PV = "events-v2-89abcdef"


def test_student_adapter_on_the_fake_cluster(tmp_path, monkeypatch, tiny_models):  # noqa: F811
    from dagster_k8s.client import DagsterKubernetesClient
    from dagster_k8s.pipes import PipesK8sClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISTILL_HOME", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://svc:PLANTED-db-pw@db/prod")
    home = (tmp_path / "home").resolve()
    cfg_path = write_config(tmp_path / "cfg.yaml", home, tiny_models["llama"],
                            {"max_steps": 2, "eval_steps": 2, "max_seq_len": 256, "early_stopping_patience": None})
    data = yaml.safe_load(cfg_path.read_text())
    data["compute"] = {"backend": "kubernetes", "kubernetes": {
        "image": "registry.example.com/distill-train:test", "namespace": "ml", "gpus": 0,
        "pvc_claim": "distill-home", "mount_path": str(home), "message_reader": "file",
        "env": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        "secret_env": {"MLFLOW_TRACKING_URI": {"secret": "mlflow", "key": "uri"}}}}
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(cfg_path)
    uri = tracking.resolve_tracking_uri(cfg, env={})
    dataset_splits.write_splits(pa.Table.from_pylist(demo_split_rows(40, seed=5)), cfg.split,
                       cfg.stage_dir("dataset_splits", PV), PV, curate=cfg.curate)

    fake = FakeKubernetes(home, script=None, secrets={("mlflow", "uri"): uri})
    monkeypatch.setattr(PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(DagsterKubernetesClient, "production_client", classmethod(lambda cls, *a, **k: fake))

    settings = SettingsResource(config_file=str(cfg_path))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_version", [PV])
    result = dg.materialize([student_adapter], partition_key=PV, instance=instance, raise_on_error=False,
                            resources={"settings": settings, "compute": ComputeResource(settings=settings),
                                       "mlflow": MlflowResource(settings=settings)})
    assert result.success, fake.result.stderr[-3000:] if fake.result else "the pod never ran"

    (namespace, body), = fake.created
    assert namespace == "ml" and "PLANTED" not in json.dumps(body)
    container = body["spec"]["containers"][0]
    assert "resources" not in container and "--cpu" in container["command"]

    (mat,) = result.asset_materializations_for_node("student_adapter")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["steps"] == 2 and md["compute"]["backend"] == "kubernetes"
    run_id = md["mlflow_run_id"]
    client = tracking.mlflow_client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["distill.compute_backend"] == "kubernetes"
    assert client.get_metric_history(run_id, "eval_loss")  # logged from inside the "pod"
    assert (home / "artifacts" / "student_adapter" / PV / "adapter" / "adapter_config.json").is_file()
    assert {"adapter/adapter_model.safetensors"} <= {a.path for a in client.list_artifacts(run_id, "adapter")}
