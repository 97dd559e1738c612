"""The local backend: real Dagster Pipes subprocess runs, one process and two gloo processes.

The launched module is `pipes_probe` (same arguments, env and launcher as the worker), so
these tests check the launch path on its own; test_training_asset_* runs the real worker.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from distill_pipeline.clients.compute import LocalCompute, WorkerJob, pod_config_yaml, worker_command
from distill_pipeline.clients.object_store import push_dir
from distill_pipeline.workers.pod import main as pod_main
from distill_pipeline.config import LocalComputeConfig, load_config

REPO = Path(__file__).resolve().parent.parent
PV = "demo-v1-12345678"
PROBE = "distill_pipeline_tests.pipes_probe"


def _job(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"home: {tmp_path / 'home'}\n")
    cfg = load_config(cfg_path, env={})
    splits = cfg.stage_dir("dataset_splits", PV)
    splits.mkdir(parents=True)
    (splits / "train.parquet").write_bytes(b"x")
    return cfg, WorkerJob(cfg=cfg, config_file=cfg_path, prompt_version=PV, splits_dir=splits,
                         output_dir=cfg.stage_dir("student_adapter", PV), env={"MLFLOW_RUN_ID": "run-42"})


def _materialize(backend, job):
    @dg.asset(partitions_def=dg.StaticPartitionsDefinition([PV]), name="student_adapter")
    def local_train(context: dg.AssetExecutionContext):
        return backend.run(context, job).get_materialize_result()

    result = dg.materialize([local_train], partition_key=PV)
    assert result.success
    (mat,) = result.asset_materializations_for_node("student_adapter")
    return {k: v.value for k, v in mat.metadata.items()}


def test_command_shapes():
    common = dict(python="py", config_file="c.yaml", prompt_version="pv", splits_dir="s", output_dir="o")
    one = worker_command(num_processes=1, **common)
    assert one == ["py", "-m", "distill_pipeline.workers.train", "--config", "c.yaml", "--prompt-version", "pv",
                   "--splits-dir", "s", "--output-dir", "o"]
    many = worker_command(num_processes=4, port=29512, **common)
    assert many[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert many[many.index("--num_processes") + 1] == "4" and "--multi_gpu" in many and "--cpu" not in many
    assert many[many.index("--main_process_port") + 1] == "29512"
    assert many[-len(one) + 1:] == one[1:]


def test_single_process_through_pipes(tmp_path):
    cfg, job = _job(tmp_path)
    backend = LocalCompute(LocalComputeConfig(use_cpu=True), cwd=str(REPO), module=PROBE)
    md = _materialize(backend, job)
    assert md["world_size"] == 1 and md["backend"] == "none"
    assert md["mlflow_run_id"] == "run-42" and md["use_cpu"] == "true"
    assert md["prompt_version"] == PV and md["partition"] == PV and md["config_exists"] is True
    assert md["splits_dir"] == str(job.splits_dir.resolve())


def test_two_gloo_processes_through_pipes(tmp_path):
    cfg, job = _job(tmp_path)
    backend = LocalCompute(LocalComputeConfig(num_processes=2, use_cpu=True, env={"OMP_NUM_THREADS": "1"}),
                           cwd=str(REPO), module=PROBE)
    md = _materialize(backend, job)
    assert md["world_size"] == 2 and md["backend"] == "gloo"
    assert md["allreduce_sum"] == 3.0  # ranks 0 and 1 contributed 1 + 2
    ranks = sorted(p.name for p in job.output_dir.iterdir())
    assert ranks == ["rank0.json", "rank1.json"]
    assert all(json.loads((job.output_dir / r).read_text())["sum"] == 3.0 for r in ranks)


def test_failed_worker_fails_the_step(tmp_path):
    cfg, job = _job(tmp_path)
    backend = LocalCompute(LocalComputeConfig(use_cpu=True), cwd=str(REPO), module="distill_pipeline_tests.no_such_module")

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition([PV]))
    def broken(context: dg.AssetExecutionContext):
        return backend.run(context, job).get_materialize_result()

    result = dg.materialize([broken], partition_key=PV, raise_on_error=False)
    assert not result.success
    assert "failed with code" in str(result.get_step_failure_events()[0].event_specific_data.error)


def test_pod_wrapper_with_object_store(tmp_path, monkeypatch):
    """The container's command, run here: config from env, splits pulled, output pushed back."""
    cfg, job = _job(tmp_path)
    store = (tmp_path / "bucket").as_uri()
    push_dir(job.splits_dir, f"{store}/artifacts/dataset_splits/{PV}")
    pod_home = tmp_path / "scratch" / "home"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DISTILL_CONFIG_YAML", pod_config_yaml(cfg))
    monkeypatch.setenv("MLFLOW_RUN_ID", "run-7")
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    rc = pod_main([
        "--prompt-version", PV,
        "--splits-dir", str(pod_home / "artifacts" / "dataset_splits" / PV),
        "--output-dir", str(pod_home / "artifacts" / "student_adapter" / PV),
        "--cpu", "--object-store-root", store, "--home", str(pod_home), "--module", PROBE,
    ])
    assert rc == 0
    assert (pod_home / "artifacts" / "dataset_splits" / PV / "train.parquet").read_bytes() == b"x"
    pushed = tmp_path / "bucket" / "artifacts" / "student_adapter" / PV / "rank0.json"
    assert json.loads(pushed.read_text()) == {"sum": 1.0}


def test_pod_wrapper_needs_the_config(monkeypatch):
    monkeypatch.delenv("DISTILL_CONFIG_YAML", raising=False)
    assert pod_main(["--prompt-version", PV, "--splits-dir", "s", "--output-dir", "o"]) == 2


def test_pod_wrapper_stages_out_after_sigterm(tmp_path):
    """An evicted pod gets SIGTERM: the worker gets it too, and its output still reaches the store."""
    cfg, job = _job(tmp_path)
    store = (tmp_path / "bucket").as_uri()
    push_dir(job.splits_dir, f"{store}/artifacts/dataset_splits/{PV}")
    pod_home = tmp_path / "scratch" / "home"
    out = pod_home / "artifacts" / "student_adapter" / PV
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    env.update(DISTILL_CONFIG_YAML=pod_config_yaml(cfg), PROBE_WAIT_FOR_SIGTERM="1")
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "distill_pipeline.workers.pod", "--prompt-version", PV,
         "--splits-dir", str(pod_home / "artifacts" / "dataset_splits" / PV), "--output-dir", str(out),
         "--cpu", "--object-store-root", store, "--home", str(pod_home), "--module", PROBE],
        cwd=REPO, env=env)
    deadline = time.time() + 120
    while not (out / "ready").exists() and time.time() < deadline and wrapper.poll() is None:
        time.sleep(0.1)
    assert (out / "ready").exists()
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=60) == 143
    pushed = tmp_path / "bucket" / "artifacts" / "student_adapter" / PV
    assert (pushed / "checkpoint-on-sigterm.json").is_file() and (pushed / "rank0.json").is_file()
