"""The training worker as its own process: crash + resume, and two-process data parallelism (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from peft import PeftModel
from transformers import AutoModelForCausalLM

from distill_pipeline.clients.compute import free_port, worker_command, worker_env
from distill_pipeline.config import load_config
from distill_pipeline.stages import student_model, student_training
from distill_pipeline_tests.train_support import (  # noqa: F401
    config_for,
    demo_splits,
    demo_tokenizer_dir,
    tiny_models,
    write_config,
)

PV = "sec-events-v1-0123abcd"


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for name in list(env):  # the test's config file alone decides; no Pipes, no MLflow run
        if name.startswith(("DISTILL_", "MLFLOW_", "DAGSTER_PIPES_")) or name == "DATABASE_URL":
            env.pop(name)
    env.update(extra)
    return env


def _command(cfg_path, splits, out, num_processes=1):
    return worker_command(python=sys.executable, num_processes=num_processes,
                          config_file=str(cfg_path), prompt_version=PV, splits_dir=str(splits),
                          output_dir=str(out), port=free_port() if num_processes > 1 else None)


def _final_metadata(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_models):  # noqa: F811
    splits = demo_splits(tmp_path / "splits", n_train=24, n_val=2)
    total = 8
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "home", tiny_models["llama"],
                            {"max_steps": total, "eval_steps": 2, "micro_batch_size": 1, "max_seq_len": 256,
                             "early_stopping_patience": None})
    out = tmp_path / "out"
    first = subprocess.Popen(_command(cfg_path, splits, out), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    seen = None
    while time.time() < deadline and first.poll() is None:
        seen = student_training.last_checkpoint(out)
        if seen is not None:
            break
        time.sleep(0.05)
    assert seen is not None, "no checkpoint appeared"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    log = first.stdout.read()
    assert first.returncode == -signal.SIGKILL, log
    seen_step = student_training.checkpoint_step(seen)
    assert seen_step < total

    second = subprocess.run(_command(cfg_path, splits, out), env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    meta = _final_metadata(second.stdout)
    resumed = meta["resumed_from_step"]
    # It resumed from the newest complete checkpoint (at least the one seen before the kill) ...
    assert resumed is not None and resumed >= seen_step and resumed % 2 == 0 and resumed < total
    assert f'"resume_from_step": {resumed}' in second.stdout
    # ... ran only the remaining steps, and ended at the configured total.
    assert meta["steps"] == meta["max_steps"] == total
    progress_steps = [int(line.split("step ")[1].split("/")[0]) for line in second.stdout.splitlines()
                      if "] step " in line and "loss=" in line and "eval_loss" not in line]
    assert progress_steps and min(progress_steps) == resumed + 1 and max(progress_steps) == total
    state = json.loads((student_training.last_checkpoint(out) / "trainer_state.json").read_text())
    assert state["global_step"] == total
    assert student_model.check_adapter_keys(out / student_training.ADAPTER) == []

    # Resuming restored weights, optimizer, schedule, RNG and data order: the adapter is the one an
    # uninterrupted run gives.
    reference = student_training.train_student(load_config(cfg_path, env={}), splits, tmp_path / "reference")
    resumed_weights = load_file(out / student_training.ADAPTER / student_model.ADAPTER_WEIGHTS)
    reference_weights = load_file(reference.adapter_dir / student_model.ADAPTER_WEIGHTS)
    assert resumed_weights.keys() == reference_weights.keys()
    for key, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[key], tensor, rtol=0, atol=1e-6, msg=key)
    assert [loss for _, loss in reference.val_losses] == pytest.approx(
        [loss for _, loss in json.loads((out / student_training.RESULT).read_text())["val_losses"]], abs=1e-6)


def test_two_process_data_parallel_training_gives_a_loadable_adapter(tmp_path, tiny_models):  # noqa: F811
    splits = demo_splits(tmp_path / "splits", n_train=16, n_val=4)
    settings = {"max_steps": 2, "eval_steps": 2, "micro_batch_size": 1, "max_seq_len": 256}
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "home", tiny_models["qwen2"], settings)
    out = tmp_path / "out"
    cmd = _command(cfg_path, splits, out, num_processes=2)
    assert "accelerate.commands.launch" in cmd and "--num_processes" in cmd

    done = subprocess.run(cmd, env=_env(**worker_env(use_cpu=True), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    meta = _final_metadata(done.stdout)
    assert meta["world_size"] == 2 and meta["steps"] == 2
    # Two ranks x 1 packed row x 2 steps: both ranks' tokens are counted.
    result = json.loads((out / student_training.RESULT).read_text())
    assert result["world_size"] == 2 and result["epochs"] > 0
    assert done.stdout.count("] start:") == 1  # only rank 0 reports

    adapter = out / student_training.ADAPTER
    assert student_model.check_adapter_keys(adapter) == []
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]), adapter)
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in model.named_parameters())

    # The distributed validation loss is the exact token-weighted mean a single process computes.
    (tmp_path / "single").mkdir()
    cfg = config_for(tmp_path / "single", tiny_models["qwen2"], **{**settings, "max_steps": 1, "eval_steps": 1})
    single = student_training.train_student(cfg, splits, tmp_path / "single" / "out")
    assert single.initial_val_loss == pytest.approx(result["initial_val_loss"], rel=1e-6)
