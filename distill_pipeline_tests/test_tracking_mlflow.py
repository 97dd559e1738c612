"""MLflow lineage on a real local MLflow store (SQLite under a temp home, no server)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.clients import tracking
from distill_pipeline.config import load_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store and an experiment, created the way the asset creates them."""
    home = tmp_path_factory.mktemp("home")
    cfg_path = home / "cfg.yaml"
    cfg_path.write_text(f"home: {home}\ntracking:\n  experiment: lineage-test\n")
    cfg = load_config(cfg_path, env={})
    uri = tracking.resolve_tracking_uri(cfg, env={})
    client = tracking.mlflow_client(uri)
    experiment_id = tracking.ensure_experiment(client, cfg.tracking.experiment,
                                               tracking.experiment_artifact_location(cfg, uri))
    return cfg, uri, client, experiment_id


def test_tracking_uri_resolution(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"home: {tmp_path}\n")
    cfg = load_config(cfg_path, env={})
    assert tracking.resolve_tracking_uri(cfg, env={}) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert tracking.resolve_tracking_uri(cfg, env={"MLFLOW_TRACKING_URI": "http://m:5000"}) == "http://m:5000"
    cfg_path.write_text(f"home: {tmp_path}\ntracking:\n  uri: http://cfg:5000\n")
    cfg = load_config(cfg_path, env={})
    assert tracking.resolve_tracking_uri(cfg, env={"MLFLOW_TRACKING_URI": "http://m:5000"}) == "http://cfg:5000"


def test_experiment_is_reused_and_stores_artifacts_under_home(store):
    cfg, uri, client, experiment_id = store
    assert uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).is_file()
    assert tracking.ensure_experiment(client, cfg.tracking.experiment, None) == experiment_id
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (cfg.home.resolve() / "mlflow" / "artifacts").as_uri()


def test_run_lineage_round_trip(store, tmp_path):
    cfg, uri, client, experiment_id = store
    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "input": ["a", "b", "c"], "target": ["x", "y", "z"]}), train)
    digest = tracking.file_sha256(train)

    run_id = tracking.start_run(
        client, experiment_id, run_name="pv-1",
        tags={"dagster.run_id": "abc-123", "dagster.partition": "pv-1", tracking.TAG_GIT_COMMIT: "deadbeef",
              "skipped": None},
        params={
            "train.learning_rate": 2e-4,
            "lora.target_modules": ["q_proj", "v_proj"],
            "database.url": "postgresql://svc:PLANTED-pw@db/x",       # credential setting: dropped
            "teacher.api_key": "sk-PLANTED",                           # credential key: dropped
            "teacher.api_key_env": "DISTILL_TEACHER_API_KEY",          # a variable name: kept
            "source.mirror": "https://reader:PLANTED-url-pw@host/path",  # URL password: masked
            "model.base": "HuggingFaceTB/SmolLM2-135M-Instruct",
        },
    )
    # The worker's side: it only knows the env.
    worker = tracking.tracker_from_env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id})
    assert isinstance(worker, tracking.MlflowTracker)
    for step, loss in enumerate([2.0, 1.5, 1.1]):
        worker.log_metrics({"train/loss": loss, "skipped": None}, step=step)
    worker.log_metrics({"eval/loss": 1.3}, step=2)
    worker.log_params({"trainer.seed": 7})
    tracker = tracking.MlflowTracker(client, run_id)
    tracker.log_dataset(train, "pv-1/train", digest, "training")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    tracker.log_artifact(adapter / "adapter_config.json", "adapter")
    tracking.finish_run(client, run_id, ok=True)

    fresh = tracking.mlflow_client(uri)  # read back through a new client: it is in the store
    run = fresh.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == experiment_id
    assert run.data.tags["dagster.run_id"] == "abc-123"
    assert run.data.tags["dagster.partition"] == "pv-1"
    assert run.data.tags["mlflow.source.git.commit"] == "deadbeef"
    assert "skipped" not in run.data.tags
    params = run.data.params
    assert params["train.learning_rate"] == "0.0002"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["teacher.api_key_env"] == "DISTILL_TEACHER_API_KEY"
    assert params["source.mirror"] == "https://reader:***@host/path"
    assert params["trainer.seed"] == "7"
    assert "database.url" not in params and "teacher.api_key" not in params
    assert "PLANTED" not in repr(params) + repr(run.data.tags)

    history = fresh.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5), (2, 1.1)]
    assert run.data.metrics["eval/loss"] == 1.3

    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "pv-1/train"
    assert inp.dataset.digest == digest[:32]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert '"num_rows": 3' in inp.dataset.profile and digest in inp.dataset.profile
    assert '"name": "target"' in inp.dataset.schema
    assert train.resolve().as_uri() in inp.dataset.source

    assert [a.path for a in fresh.list_artifacts(run_id, "adapter")] == ["adapter/adapter_config.json"]
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "adapter" / "adapter_config.json"
    assert stored.read_text() == '{"r": 8}' and str(cfg.home.resolve()) in str(stored)

    link = tracking.run_link(None, uri, experiment_id, run_id)
    assert link == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    assert tracking.run_link(None, "https://u:pw@mlflow.example.com/", "1", "r") == \
        "https://u:***@mlflow.example.com/#/experiments/1/runs/r"


def test_failed_run_is_marked_failed(store):
    _, _, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, run_name="boom", tags={}, params={})
    tracking.finish_run(client, run_id, ok=False)
    assert client.get_run(run_id).info.status == "FAILED"


def test_tracker_from_env_is_null_without_a_run_or_off_rank_zero():
    assert isinstance(tracking.tracker_from_env({}), tracking.NullTracker)
    assert isinstance(tracking.tracker_from_env({"MLFLOW_TRACKING_URI": "sqlite:///x.db"}), tracking.NullTracker)
    env = {"MLFLOW_TRACKING_URI": "sqlite:///x.db", "MLFLOW_RUN_ID": "r", "RANK": "1"}
    assert isinstance(tracking.tracker_from_env(env), tracking.NullTracker)


def test_secret_names_are_whole_words():
    from distill_pipeline.masking import is_secret_name as secret_name

    for name in ("HF_TOKEN", "PGPASSWORD", "teacher.api_key", "AWS_SECRET_ACCESS_KEY", "DATABASE_URL",
                 "MLFLOW_TRACKING_TOKEN", "OPENAI_APIKEY"):
        assert secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "train.sample_max_new_tokens", "NCCL_DEBUG", "train.max_seq_len"):
        assert not secret_name(name), name


def test_safe_params_drop_and_mask():
    from pydantic import SecretStr

    out = tracking.safe_params({
        "a.password": "x", "b.token": "y", "c.secret_name": "z", "d": SecretStr("s"),
        "e.urls": ["postgresql://u:pw@h/db", "http://h/ok"], "f": None, "g": True,
    })
    assert out == {"e.urls": '["postgresql://u:***@h/db", "http://h/ok"]', "g": "True"}
