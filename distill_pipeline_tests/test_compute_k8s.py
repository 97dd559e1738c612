"""The Kubernetes backend: the pod a cluster would receive, checked without a cluster.

The only fake is the Kubernetes API (there is no cluster here): a real Dagster
materialization runs the real dagster-k8s `PipesK8sClient`, whose create-pod request we
capture. The fake "kubelet" then runs a process with exactly the pod's environment
(secretKeyRefs resolved from a fake Secret store, the PVC mount mapped to a local dir) and
that process talks Pipes back through the shared-volume message file.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_pipes import decode_param

from distill_pipeline.clients import object_store
from distill_pipeline.clients.compute import CONFIG_YAML_ENV, KubernetesCompute, WorkerJob
from distill_pipeline.clients.object_store import pull_dir, push_dir
from distill_pipeline.config import ConfigError, load_config

PV = "sec-events-v1-0a1b2c3d"
RUN_ID = "4f1c2e8a9b7d4c6e8f0a1b2c3d4e5f60"
PLANTED = {
    "DATABASE_URL": "postgresql://svc:PLANTED-db-password@db.internal:5432/prod",
    "DISTILL_TEACHER_API_KEY": "sk-PLANTED-teacher-key",
    "MLFLOW_TRACKING_PASSWORD": "PLANTED-mlflow-password",
    "HF_TOKEN": "hf_PLANTEDtoken",
}
SECRETS = {("mlflow-auth", "password"): PLANTED["MLFLOW_TRACKING_PASSWORD"], ("hf", "token"): PLANTED["HF_TOKEN"]}

K8S_YAML = """
home: {home}
compute:
  backend: kubernetes
  kubernetes:
    image: registry.example.com/distill-train:1.2.3
    namespace: ml-training
    service_account: distill-trainer
    gpus: 2
    cpu: "16"
    memory: 96Gi
    node_selector: {{nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}}
    tolerations:
      - {{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}
    image_pull_secrets: [regcred]
    pvc_claim: distill-home
    mount_path: /mnt/distill
    message_reader: {reader}
    tracking_uri: http://mlflow.ml.svc:5000
    env: {{NCCL_DEBUG: WARN}}
    secret_env:
      MLFLOW_TRACKING_PASSWORD: {{secret: mlflow-auth, key: password}}
      HF_TOKEN: {{secret: hf, key: token}}
tracking:
  experiment: k8s-test
"""


def _config(tmp_path, monkeypatch, reader="file", extra=""):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    path = tmp_path / "k8s.yaml"
    path.write_text(K8S_YAML.format(home=home, reader=reader) + extra)
    cfg = load_config(path)
    assert cfg.database.url.get_secret_value() == PLANTED["DATABASE_URL"]  # the secret is really in the config
    return cfg, path


def _job(cfg, path):
    splits = cfg.stage_dir("dataset_splits", PV)
    splits.mkdir(parents=True)
    (splits / "train.parquet").write_bytes(b"train")
    return WorkerJob(cfg=cfg, config_file=path, prompt_version=PV, splits_dir=splits,
                    output_dir=cfg.stage_dir("student_adapter", PV),
                    env={"MLFLOW_TRACKING_URI": "sqlite:////dagster-side/mlflow.db", "MLFLOW_RUN_ID": RUN_ID})


class FakeKubernetes:
    """Stands in for the API server and kubelet: records the request, runs the container."""

    def __init__(self, local_mount: Path, script: str | None, secrets: dict | None = None):
        self.local_mount = local_mount
        self.script = script  # None: run the container's own command
        self.secrets = SECRETS if secrets is None else secrets
        self.created = []
        self.deleted = []
        self.core_api = self
        self.result = None

    # core_api
    def create_namespaced_pod(self, namespace, body):
        import kubernetes

        self.created.append((namespace, kubernetes.client.ApiClient().sanitize_for_serialization(body)))

    def delete_namespaced_pod(self, name, namespace):
        self.deleted.append((namespace, name))

    # DagsterKubernetesClient
    def wait_for_pod(self, pod_name, namespace, **kwargs):
        _, body = self.created[-1]
        container = body["spec"]["containers"][0]
        mount = container["volumeMounts"][0]["mountPath"]
        env = {"PATH": "/usr/bin:/bin"}
        for item in container["env"]:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[(ref["name"], ref["key"])]
            else:
                env[item["name"]] = item["value"]
        if "DAGSTER_PIPES_MESSAGES" in env:  # the volume mount: the pod's path is our local dir
            params = decode_param(env["DAGSTER_PIPES_MESSAGES"])
            if "path" in params:
                params["path"] = params["path"].replace(mount, str(self.local_mount), 1)
            from dagster_pipes import encode_param

            env["DAGSTER_PIPES_MESSAGES"] = encode_param(params)
        if self.script is None:
            command = container["command"]
            assert command[0] == "python"
            command = [sys.executable, *command[1:]]
        else:
            command = [sys.executable, "-c", self.script]
        self.result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert self.result.returncode == 0, self.result.stderr


POD_PROCESS = textwrap.dedent("""
    import os
    from dagster_pipes import open_dagster_pipes
    with open_dagster_pipes() as pipes:
        pipes.report_asset_materialization(metadata={
            "seen_run_id": os.environ["MLFLOW_RUN_ID"],
            "seen_partition": pipes.partition_key,
            "seen_extras_run": pipes.extras["mlflow_run_id"],
            "secret_from_ref": os.environ["MLFLOW_TRACKING_PASSWORD"] == "PLANTED-mlflow-password",
        })
""")


def _materialize_through_fake_cluster(monkeypatch, cfg, job, fake):
    from dagster_k8s.client import DagsterKubernetesClient
    from dagster_k8s.pipes import PipesK8sClient

    monkeypatch.setattr(PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(DagsterKubernetesClient, "production_client", classmethod(lambda cls, *a, **k: fake))
    backend = KubernetesCompute(cfg.compute.kubernetes)

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition([PV]), name="student_adapter")
    def train_on_cluster(context: dg.AssetExecutionContext):
        invocation = backend.run(context, job, extras={"mlflow_run_id": RUN_ID})
        return invocation.get_materialize_result()

    result = dg.materialize([train_on_cluster], partition_key=PV)
    assert result.success
    mats = result.asset_materializations_for_node("student_adapter")
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_pod_spec_sent_to_the_cluster(tmp_path, monkeypatch):
    cfg, path = _config(tmp_path, monkeypatch)
    job = _job(cfg, path)
    fake = FakeKubernetes(cfg.home.resolve(), POD_PROCESS)
    metadata = _materialize_through_fake_cluster(monkeypatch, cfg, job, fake)

    assert len(fake.created) == 1
    namespace, body = fake.created[0]
    assert namespace == "ml-training"
    assert fake.deleted == [("ml-training", body["metadata"]["name"])]
    spec = body["spec"]
    (container,) = spec["containers"]

    assert container["image"] == "registry.example.com/distill-train:1.2.3"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "16", "memory": "96Gi"}
    assert container["resources"]["requests"] == {"cpu": "16", "memory": "96Gi"}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "distill-trainer"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["restartPolicy"] == "Never"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["distill-home"]["persistentVolumeClaim"] == {"claimName": "distill-home"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "distill-home", "mountPath": "/mnt/distill"} in container["volumeMounts"]
    assert body["metadata"]["labels"]["distill/prompt-version"] == PV
    assert body["metadata"]["labels"]["distill/mlflow-run-id"] == RUN_ID

    # The worker runs through the pod wrapper, on pod paths, one process per GPU.
    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "distill_pipeline.workers.pod"]
    assert cmd[cmd.index("--splits-dir") + 1] == f"/mnt/distill/artifacts/dataset_splits/{PV}"
    assert cmd[cmd.index("--output-dir") + 1] == f"/mnt/distill/artifacts/student_adapter/{PV}"
    assert cmd[cmd.index("--num-processes") + 1] == "2"

    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert plain["MLFLOW_RUN_ID"] == RUN_ID
    assert plain["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"  # the pod's URI, not the Dagster side's
    assert plain["DISTILL_HOME"] == "/mnt/distill"
    assert plain["NCCL_DEBUG"] == "WARN"
    assert "ACCELERATE_USE_CPU" not in plain
    assert refs == {"MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-auth", "key": "password"},
                    "HF_TOKEN": {"name": "hf", "key": "token"}}
    assert "DAGSTER_PIPES_CONTEXT" in plain
    # Pipes messages go through a file on the shared volume, named for the pod's mount.
    assert decode_param(plain["DAGSTER_PIPES_MESSAGES"])["path"].startswith("/mnt/distill/pipes/")

    # No secret value anywhere: not in the spec, not in the shipped config, not in the Pipes context.
    sent = json.dumps(body) + json.dumps(decode_param(plain["DAGSTER_PIPES_CONTEXT"]))
    for name, value in PLANTED.items():
        assert value not in sent, f"{name} leaked into the pod spec"
    assert "PLANTED" not in sent

    # The shipped config is the Dagster side's config minus the database section.
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(plain[CONFIG_YAML_ENV])
    pod_cfg = load_config(shipped, env={"DISTILL_HOME": plain["DISTILL_HOME"]})
    assert "database" not in yaml.safe_load(plain[CONFIG_YAML_ENV])
    assert pod_cfg.database.url is None
    assert pod_cfg.model_dump(exclude={"home", "database"}) == cfg.model_dump(exclude={"home", "database"})

    # The process in the "pod" saw its env and reported back through Pipes.
    assert metadata == {"seen_run_id": RUN_ID, "seen_partition": PV, "seen_extras_run": RUN_ID,
                        "secret_from_ref": True}


def test_default_reader_streams_pod_logs(tmp_path, monkeypatch):
    from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

    cfg, path = _config(tmp_path, monkeypatch, reader="logs")
    backend = KubernetesCompute(cfg.compute.kubernetes)
    assert isinstance(backend.message_reader(_job(cfg, path), "run1"), PipesK8sPodLogsMessageReader)


def test_cpu_pod_has_no_gpu_limit_and_trains_on_cpu(tmp_path, monkeypatch):
    cfg, path = _config(tmp_path, monkeypatch, reader="logs")
    k8s = cfg.compute.kubernetes.model_copy(update={"gpus": 0, "cpu": None, "memory": None})
    _, spec = KubernetesCompute(k8s).build_pod_spec(_job(cfg, path))
    container = spec["containers"][0]
    assert "resources" not in container
    assert "--cpu" in container["command"]
    assert {"name": "ACCELERATE_USE_CPU", "value": "true"} in container["env"]


@pytest.mark.parametrize("snippet, message", [
    ("compute:\n  backend: kubernetes\n  kubernetes:\n    pvc_claim: x\n", r"compute.*image is required"),
    ("compute:\n  backend: kubernetes\n  kubernetes:\n    image: i\n", r"pvc_claim or compute.kubernetes.object_store_root"),
    ("compute:\n  kubernetes:\n    env: {HF_TOKEN: hf_x}\n", r"compute.kubernetes.env.HF_TOKEN looks like a credential"),
    ("compute:\n  kubernetes:\n    env: {STORE: 's3://k:verysecret@bucket/x'}\n", r"env.STORE looks like a credential"),
    ("compute:\n  kubernetes:\n    tracking_uri: https://u:pw@mlflow.example.com\n", r"tracking_uri has a password"),
    ("compute:\n  kubernetes:\n    message_reader: file\n", r"message_reader=file needs a shared volume"),
    ("compute:\n  kubernetes:\n    gpus: -1\n", r"compute.kubernetes.gpus"),
])
def test_bad_kubernetes_settings_are_named(tmp_path, snippet, message):
    path = tmp_path / "bad.yaml"
    path.write_text(snippet)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_local_mlflow_store_is_refused_for_a_pod(tmp_path, monkeypatch):
    cfg, path = _config(tmp_path, monkeypatch, reader="logs")
    k8s = cfg.compute.kubernetes.model_copy(update={"tracking_uri": None})
    backend = KubernetesCompute(k8s, tracking_uri="sqlite:////dagster/mlflow.db")
    with pytest.raises(ValueError, match="cannot reach the local MLflow store"):
        backend.build_pod_spec(_job(cfg, path))


def test_credential_from_code_is_refused(tmp_path, monkeypatch):
    cfg, path = _config(tmp_path, monkeypatch, reader="logs")
    job = _job(cfg, path)
    job = WorkerJob(**{**job.__dict__, "env": {**job.env, "AWS_SECRET_ACCESS_KEY": "abc"}})
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY .*looks like a credential"):
        KubernetesCompute(cfg.compute.kubernetes).build_pod_spec(job)


def test_object_store_layout_and_sync(tmp_path, monkeypatch):
    cfg, path = _config(tmp_path, monkeypatch, reader="logs")
    store = tmp_path / "bucket"
    k8s = cfg.compute.kubernetes.model_copy(update={"pvc_claim": None, "object_store_root": store.as_uri()})
    job = _job(cfg, path)
    (job.splits_dir / "hf").mkdir()
    (job.splits_dir / "hf" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    _, spec = KubernetesCompute(k8s).build_pod_spec(job)
    container = spec["containers"][0]
    cmd = container["command"]
    assert cmd[cmd.index("--object-store-root") + 1] == store.as_uri()
    assert cmd[cmd.index("--splits-dir") + 1] == f"/scratch/home/artifacts/dataset_splits/{PV}"
    assert {"name": "scratch", "emptyDir": {}} in spec["volumes"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])

    # What the Dagster side uploads and the pod downloads (file:// stands in for s3://).
    uri = object_store.object_uri(store.as_uri(), cfg.home, job.splits_dir)
    push_dir(job.splits_dir, uri)
    scratch = tmp_path / "scratch"
    assert pull_dir(uri, scratch)
    assert (scratch / "train.parquet").read_bytes() == b"train"
    assert json.loads((scratch / "hf" / "dataset_dict.json").read_text()) == {"splits": ["train"]}
    assert not pull_dir(uri + "-missing", tmp_path / "nothing")


def test_backend_override_gets_the_same_checks(tmp_path):
    from distill_pipeline.clients.compute import LocalCompute, compute_client

    path = tmp_path / "cfg.yaml"
    path.write_text("compute:\n  kubernetes:\n    image: registry.example.com/distill-train:1\n")
    cfg = load_config(path, env={})
    assert isinstance(compute_client(cfg), LocalCompute)
    with pytest.raises(ConfigError, match="pvc_claim or compute.kubernetes.object_store_root"):
        compute_client(cfg, backend="kubernetes")
    with pytest.raises(ConfigError, match="expected local or kubernetes"):
        compute_client(cfg, backend="slurm")
