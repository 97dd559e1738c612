"""`student_adapter` as Dagster materializes it: MLflow run, local Pipes worker, metadata.

Real Dagster runs on an ephemeral instance, a real local MLflow store under the test's
home, the real worker process (`python -m distill_pipeline.workers.train`).
"""

import shutil
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from distill_pipeline.clients import tracking
from distill_pipeline.config import load_config
from distill_pipeline.defs.resources import SettingsResource
from distill_pipeline.defs.assets import student_adapter
from distill_pipeline.defs.resources import ComputeResource, MlflowResource
from distill_pipeline.stages import dataset_splits
from distill_pipeline_tests.train_support import (  # noqa: F401
    demo_split_rows,
    demo_tokenizer_dir,
    tiny_models,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
PV = "events-v1-0123abcd"


def _resources(cfg_path: Path) -> dict:
    settings = SettingsResource(config_file=str(cfg_path))
    return {"settings": settings, "compute": ComputeResource(settings=settings),
            "mlflow": MlflowResource(settings=settings)}


def _materialize(cfg_path: Path, raise_on_error: bool = True, instance=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_version", [PV])
    return dg.materialize([student_adapter], resources=_resources(cfg_path), partition_key=PV,
                          instance=instance, raise_on_error=raise_on_error)


def _runs(cfg):
    uri = tracking.resolve_tracking_uri(cfg, env={})
    client = tracking.mlflow_client(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, ([] if experiment is None else client.search_runs([experiment.experiment_id]))


def _config(tmp_path, extra: str = "") -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"home: {tmp_path / 'home'}\ntracking:\n  experiment: asset-test\n{extra}")
    return path


def test_missing_splits_fail_before_any_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_path = _config(tmp_path)
    result = _materialize(cfg_path, raise_on_error=False)
    assert not result.success
    error = str(result.get_step_failure_events()[0].event_specific_data.error)
    assert "materialize dataset_splits" in error and PV in error
    _, runs = _runs(load_config(cfg_path, env={}))
    assert runs == []


def test_worker_failure_marks_the_mlflow_run_failed(tmp_path, monkeypatch):
    """Splits without the columns training needs: the worker must fail, and the run says so."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg_path = _config(tmp_path)
    cfg = load_config(cfg_path, env={})
    out = cfg.stage_dir("dataset_splits", PV)
    out.mkdir(parents=True)
    for name in ("train", "val", "test"):
        pq.write_table(pa.table({"id": [1, 2]}), out / f"{name}.parquet")
    (out / "manifest.json").write_text('{"splits": {}}')

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(cfg_path, raise_on_error=False, instance=instance)
    assert not result.success
    error = str(result.get_step_failure_events()[0].event_specific_data.error)
    assert "External execution process failed with code 1" in error
    # It was the worker that failed: it had already reported its start (with the run id) through Pipes.
    client, runs = _runs(cfg)
    (run,) = runs
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("info:" in m and run.info.run_id in m for m in logs)
    assert run.info.status == "FAILED"
    assert run.data.tags["dagster.partition"] == PV
    assert run.data.tags["dagster.asset_key"] == "student_adapter"
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert run.data.params["data.train.sha256"] == tracking.file_sha256(out / "train.parquet")


def test_dagster_yaml_bounds_the_gpu_pool(tmp_path):
    """The repository's dagster.yaml, loaded as `dagster dev` loads $DAGSTER_HOME/dagster.yaml."""
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        # The limit really applies to the asset's pool: one slot, held by one step at a time.
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    finally:
        instance.dispose()
    defs = dg.Definitions(assets=[student_adapter], resources=_resources(tmp_path / "unused.yaml"))
    node = defs.resolve_asset_graph().get(dg.AssetKey("student_adapter"))
    assert node.pools == {"gpu"}


def test_materialize_student_adapter_on_a_tiny_model(tmp_path, monkeypatch, tiny_models):  # noqa: F811
    """The whole asset: real splits, real worker over Pipes, real MLflow lineage."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISTILL_HOME", raising=False)
    steps = 4
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "home", tiny_models["llama"],
                            {"max_steps": steps, "eval_steps": 2, "max_seq_len": 256,
                             "early_stopping_patience": None})
    cfg = load_config(cfg_path, env={})
    examples = pa.Table.from_pylist(demo_split_rows(60, seed=3))
    manifest = dataset_splits.write_splits(examples, cfg.split, cfg.stage_dir("dataset_splits", PV), PV,
                                  curate=cfg.curate)

    result = _materialize(cfg_path)
    assert result.success
    (mat,) = result.asset_materializations_for_node("student_adapter")
    md = {k: v.value for k, v in mat.metadata.items()}

    # The worker's own report came through Pipes, merged with the lineage.
    assert md["steps"] == md["max_steps"] == steps
    assert md["initial_val_loss"] > 0 and md["best_val_loss"] > 0
    assert md["train_examples"] == manifest["splits"]["train"]["rows"]
    adapter_dir = Path(md["adapter_path"])
    assert adapter_dir.resolve() == cfg.stage_dir("student_adapter", PV).resolve() / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    adapter_sha = tracking.file_sha256(adapter_dir / "adapter_model.safetensors")
    assert md["adapter_sha256"] == adapter_sha
    assert mat.tags["dagster/data_version"] == adapter_sha[:16]
    run_id = md["mlflow_run_id"]
    assert md["mlflow_run"].endswith(f"/runs/{run_id}")
    assert md["train_sha256"] == manifest["splits"]["train"]["sha256"][:16]

    client, runs = _runs(cfg)
    (run,) = runs
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert md["mlflow_experiment_id"] == run.info.experiment_id
    tags = run.data.tags
    assert tags["dagster.run_id"] == result.run_id
    assert tags["dagster.asset_key"] == "student_adapter" and tags["dagster.partition"] == PV
    assert tags["distill.compute_backend"] == "local"
    assert "mlflow.source.git.commit" in tags
    params = run.data.params
    assert params["train.base_model.source"] == str(tiny_models["llama"])
    assert params["train.lora.r"] == "4" and params["train.max_steps"] == str(steps)
    assert params["data.train.sha256"] == manifest["splits"]["train"]["sha256"]
    assert params["data.val.rows"] == str(manifest["splits"]["val"]["rows"])
    assert params["prompt_version"] == PV and params["compute.backend"] == "local"
    assert not any(k.startswith(("database.", "teacher.", "compute.kubernetes")) for k in params)

    # Per-step metrics logged by the worker into the run the asset created.
    assert len(client.get_metric_history(run_id, "loss")) >= 2
    eval_steps = [m.step for m in client.get_metric_history(run_id, "eval_loss")]
    assert eval_steps[0] == 0 and steps in eval_steps

    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in run.inputs.dataset_inputs}
    assert contexts == {f"{PV}/train": "training", f"{PV}/val": "validation"}
    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests[f"{PV}/train"] == manifest["splits"]["train"]["sha256"][:32]

    artifacts = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    stored = Path(client.download_artifacts(run_id, "adapter/adapter_model.safetensors", str(tmp_path / "dl")))
    assert tracking.file_sha256(stored) == adapter_sha
    config_artifact = Path(client.download_artifacts(run_id, "config/pipeline.yaml", str(tmp_path / "dl")))
    shipped = yaml.safe_load(config_artifact.read_text())
    assert "database" not in shipped and shipped["train"]["base_model"]["source"] == str(tiny_models["llama"])

    # The same inputs again: the adapter in place is reported, nothing is trained, no new MLflow run.
    again = _materialize(cfg_path)
    (mat2,) = again.asset_materializations_for_node("student_adapter")
    md2 = {k: v.value for k, v in mat2.metadata.items()}
    assert md["reused"] is False and md2["reused"] is True
    assert md2["mlflow_run_id"] == run_id and md2["adapter_sha256"] == adapter_sha
    assert md2["best_val_loss"] == md["best_val_loss"] and md2["steps"] == steps
    assert mat2.tags["dagster/data_version"] == adapter_sha[:16]
    assert len(_runs(cfg)[1]) == 1

    # A changed training setting trains again, in a new MLflow run.
    write_config(cfg_path, tmp_path / "home", tiny_models["llama"],
                 {"max_steps": steps, "eval_steps": 2, "max_seq_len": 256, "early_stopping_patience": None,
                  "learning_rate": 0.001})
    third = _materialize(cfg_path)
    (mat3,) = third.asset_materializations_for_node("student_adapter")
    assert mat3.metadata["reused"].value is False and mat3.metadata["mlflow_run_id"].value != run_id
    assert len(_runs(cfg)[1]) == 2


def test_config_flag_drives_data_training_compute_and_mlflow(tmp_path, tiny_models):  # noqa: F811
    """`distill --config X materialize student_adapter`, with $DISTILL_CONFIG naming another file: X's splits
    are trained on, X's compute.local.env reaches the worker, and the run lands in X's MLflow store."""
    import json
    import os
    import subprocess
    import sys

    from distill_pipeline.stages.prompts import load_prompts

    x_dir = tmp_path / "x"
    (x_dir / "prompts").mkdir(parents=True)
    shutil.copy(REPO / "distill_pipeline" / "demo" / "prompts" / "sec_events_v1.yaml", x_dir / "prompts")
    cfg_path = write_config(x_dir / "cfg.yaml", tmp_path / "x-home", tiny_models["llama"],
                            {"max_steps": 2, "eval_steps": 2, "max_seq_len": 256, "early_stopping_patience": None})
    data = yaml.safe_load(cfg_path.read_text())
    data["tracking"] = {"experiment": "x-experiment"}
    # Only the worker sees this override: it proves compute.local.env of X reached it.
    data["compute"] = {"local": {"env": {"DISTILL__TRAIN__SAMPLE_COUNT": "1", "OMP_NUM_THREADS": "1"}}}
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(cfg_path, env={})
    (key,) = load_prompts(cfg.prompts_dir)
    manifest = dataset_splits.write_splits(pa.Table.from_pylist(demo_split_rows(40, seed=3)), cfg.split,
                                           cfg.stage_dir("dataset_splits", key), key, curate=cfg.curate)
    decoy = tmp_path / "decoy.yaml"
    decoy.write_text(f"home: {tmp_path / 'decoy-home'}\ntracking:\n  experiment: decoy\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL", "DAGSTER_HOME", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-m", "distill_pipeline.cli", "--config", str(cfg_path), "materialize",
                           "student_adapter", "--partition", key], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "DISTILL_CONFIG": str(decoy)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert not (tmp_path / "decoy-home").exists()
    output_dir = cfg.stage_dir("student_adapter", key)
    assert (output_dir / "adapter" / "adapter_config.json").is_file()
    assert len(json.loads((output_dir / "train_result.json").read_text())["samples"]) == 1
    client, runs = _runs(cfg)
    assert str(tracking.resolve_tracking_uri(cfg, env={})).startswith("sqlite:///" + str(tmp_path / "x-home"))
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.params["data.train.sha256"] == manifest["splits"]["train"]["sha256"]
    assert runs[0].data.tags["dagster.partition"] == key


def test_any_dagster_home_gets_the_settings_and_a_killed_run_is_marked_failed(tmp_path, tiny_models):  # noqa: F811
    """Outside the checkout: the DAGSTER_HOME a command uses gets the pipeline's instance settings; a `distill`
    process killed mid-run leaves its run STARTED, and the next command marks it failed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from distill_pipeline.stages.prompts import load_prompts

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    shutil.copy(REPO / "distill_pipeline" / "demo" / "prompts" / "sec_events_v1.yaml", prompts)
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "home", tiny_models["llama"],
                            {"max_steps": 100_000, "eval_steps": 100_000, "max_seq_len": 256,
                             "early_stopping_patience": None})
    cfg = load_config(cfg_path, env={})
    (key,) = load_prompts(cfg.prompts_dir)
    dataset_splits.write_splits(pa.Table.from_pylist(demo_split_rows(40, seed=3)), cfg.split,
                                cfg.stage_dir("dataset_splits", key), key, curate=cfg.curate)
    dagster_home = tmp_path / "somewhere" / "dagster-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL", "MLFLOW_"))}
    env["DAGSTER_HOME"] = str(dagster_home)
    command = [sys.executable, "-m", "distill_pipeline.cli", "--config", str(cfg_path), "materialize"]

    proc = subprocess.Popen(command + ["student_adapter", "--partition", key], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (cfg.stage_dir("student_adapter", key) / "run_state.json").exists():  # the worker is training
            assert proc.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker, as an OOM kill or a lost laptop lid would
        proc.wait()
    assert (dagster_home / "dagster.yaml").read_text() == (REPO / "distill_pipeline" / "dagster.yaml").read_text()

    def statuses() -> list[str]:
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        try:
            return [r.status.value for r in instance.get_runs()]
        finally:
            instance.dispose()

    assert statuses() == ["STARTED"]
    again = subprocess.run(command + ["no_such_asset"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "marked 1 run(s) of killed distill processes as failed" in again.stdout
    assert statuses() == ["FAILURE"]
