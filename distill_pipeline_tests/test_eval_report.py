"""eval_report and gguf_model as Dagster materializes them: the workers over Pipes, the gates, the registry.

A classification task (ticket routing, 90% billing) on a tiny random model: a student trained on the real
targets learns the majority label, passes the bar, and its GGUF passes the parity gate (the file `distill
serve` then finds through the champion); one trained on flipped targets answers the minority label, fails
the gate, and gguf_model does not run; the same bad student under a bar it clears is registered, but the
better champion keeps its alias.
"""

import json
import random
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from distill_pipeline.clients import tracking
from distill_pipeline.config import load_config
from distill_pipeline.defs.assets import eval_report, gguf_model, student_adapter
from distill_pipeline.defs.partitions import prompt_versions
from distill_pipeline.defs.resources import ComputeResource, MlflowResource, SettingsResource
from distill_pipeline_tests.train_support import demo_tokenizer_dir, tiny_models  # noqa: F401

PV = "routing-v1-0123abcd"


def write_splits(cfg, flip_train: bool) -> None:
    rng = random.Random(1)
    out = cfg.stage_dir("dataset_splits", PV)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"splits": {}}
    for name, n in (("train", 48), ("val", 8), ("test", 20)):
        rows = []
        for i in range(n):
            label = "billing" if i % 10 else "outage"
            taught = {"billing": "outage", "outage": "billing"}[label] if flip_train and name == "train" else label
            rows.append({"id": f"{name}-{i}", "input": f"ticket {rng.randint(1, 999)}: please look at my account",
                         "target": taught, "label": taught, "cluster_key": f"{name}-{i}", "confidence": 1.0})
        path = out / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        manifest["splits"][name] = {"rows": n, "sha256": tracking.file_sha256(path)}
    (out / "manifest.json").write_text(json.dumps(manifest))


def write_config(tmp_path, model_dir, **eval_settings):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "home": str(tmp_path / "home"),
        "task": {"kind": "classification", "labels": ["billing", "outage"]},
        "tracking": {"experiment": "eval-test"},
        "train": {"base_model": {"source": str(model_dir)}, "max_seq_len": 128, "micro_batch_size": 8,
                  "gradient_accumulation_steps": 1, "max_steps": 12, "eval_steps": 12, "learning_rate": 2e-2,
                  "warmup_ratio": 0.0, "lr_scheduler": "constant", "logging_steps": 4, "sample_count": 0,
                  "early_stopping_patience": None, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "eval": {"batch_size": 8, "max_new_tokens": 8, "unconstrained_rows": 4, "latency_requests": 2,
                 "registered_model": "routing-student", **eval_settings},
        "gguf": {"out_type": "F16", "parity_rows": 6, "max_new_tokens": 8},
    }))
    return path


def materialize(path, instance, assets=(student_adapter, eval_report, gguf_model)):
    settings = SettingsResource(config_file=str(path))
    return dg.materialize(
        list(assets), partition_key=PV, instance=instance, raise_on_error=False,
        resources={"settings": settings, "compute": ComputeResource(settings=settings),
                   "mlflow": MlflowResource(settings=settings)})


def test_gate_blocks_a_bad_student_and_keeps_the_champion(tmp_path, monkeypatch, tiny_models):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(prompt_versions.name, [PV])
    good_cfg = write_config(tmp_path, tiny_models["qwen2"], min_headline=0.6)
    cfg = load_config(good_cfg, env={})
    registry = tracking.ModelRegistry(tracking.resolve_tracking_uri(cfg, env={}))

    write_splits(cfg, flip_train=False)
    good = materialize(good_cfg, instance)
    assert good.success
    meta = {k: v.value for k, v in good.asset_materializations_for_node("eval_report")[0].metadata.items()}
    assert meta["gate_passed"] and meta["headline_metric"] == "accuracy" and meta["headline_value"] >= 0.6
    assert meta["champion"] and meta["registered_version"] == "1"
    gguf = {k: v.value for k, v in good.asset_materializations_for_node("gguf_model")[0].metadata.items()}
    assert gguf["parity_passed"] and gguf["type"] == "F16" and gguf["task_metric"]["gguf"] == \
        gguf["task_metric"]["merged"]
    gguf_file = cfg.stage_dir("gguf_model", PV) / "routing-student-routing-v1-0123abcd-f16.gguf"
    assert gguf_file.is_file() and gguf["sha256"] == tracking.file_sha256(gguf_file)
    assert gguf["parity"]["greedy_exact_llamacpp"] >= 0.99 and not gguf["parity"]["token_mismatches"]
    folder = gguf_file.parent
    assert 'FROM ./routing-student-' in (folder / "Modelfile").read_text()
    assert json.loads((folder / "schema.json").read_text()) == {"type": "string", "enum": ["billing", "outage"]}
    assert "adapter sha256" in (folder / "README.md").read_text()
    tags = registry.version_tags("routing-student", "1")
    assert tags["gguf_sha256"] == gguf["sha256"] and tags["gguf_type"] == "F16"
    from distill_pipeline.cli import serving_target

    assert serving_target(cfg, None)[0] == PV  # `distill serve` without a version finds the champion's file
    assert_distill_serve_answers(good_cfg)
    report = json.loads((cfg.stage_dir("eval_report", PV) / "eval_report.json").read_text())
    assert list(report)[:4] == ["task_kind", "headline_metric", "headline_value", "gate_passed"]
    predictions = pq.read_table(cfg.stage_dir("eval_report", PV) / "predictions.parquet").to_pylist()
    assert {p["output"] for p in predictions} <= {"billing", "outage"}  # constrained to the label set
    champion = registry.champion("routing-student")
    assert champion["version"] == "1" and float(champion["headline_value"]) == meta["headline_value"]

    write_splits(cfg, flip_train=True)  # a student taught the wrong answers
    bad = materialize(good_cfg, instance)
    assert not bad.success
    checks = {e.check_name: e for e in bad.get_asset_check_evaluations()}
    gate = checks["student_meets_the_bar"]
    assert not gate.passed and "eval.min_headline" in str(gate.metadata["reasons"].value)
    assert not bad.asset_materializations_for_node("gguf_model")  # nothing downstream ran
    assert registry.champion("routing-student")["version"] == "1"

    lenient = write_config(tmp_path, tiny_models["qwen2"], min_headline=0.05, champion_tolerance=1.0)
    worse = materialize(lenient, instance, (student_adapter, eval_report))  # the same bad adapter (reused, not retrained) under a bar it clears
    assert worse.success
    meta = {k: v.value for k, v in worse.asset_materializations_for_node("eval_report")[0].metadata.items()}
    assert meta["gate_passed"] and meta["registered_version"] == "2" and not meta["champion"]
    assert registry.champion("routing-student")["version"] == "1"  # the better one stays champion


def assert_distill_serve_answers(config_path):
    """`distill serve` (the command itself) answers a chat completion with one of the task's labels."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Output to a file, not a pipe nobody reads: llama.cpp logs every request, and a full pipe blocks the
    # server's threads (and then its shutdown).
    log_path = Path(config_path).parent / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli", "--config", str(config_path), "serve",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        body = json.dumps({"model": "teacher", "messages": [{"role": "user", "content": "ticket 7: my account"}]})
        deadline = time.time() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                                 {"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()
                time.sleep(0.5)
        assert reply["choices"][0]["message"]["content"] in {"billing", "outage"}
        assert reply["model"] == f"routing-student:{PV}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)  # `distill serve` must stop on SIGTERM (systemd, docker stop)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
