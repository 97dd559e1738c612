"""Real LoRA training steps on tiny random Llama / Qwen2 models through `train_student`."""

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from distill_pipeline.clients.tracking import file_sha256
from distill_pipeline.stages import student_model, student_trainer, student_training
from distill_pipeline_tests.train_support import (  # noqa: F401
    config_for,
    demo_split_rows,
    demo_splits,
    demo_tokenizer_dir,
    tiny_models,
    write_splits,
)


class RecordingTracker:
    run_id = "test-run"

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_dataset(self, path, name, digest, context):
        pass

    def set_tags(self, tags):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_changes_the_adapter_and_never_the_base(tmp_path, tiny_models, arch):  # noqa: F811
    base_dir = tiny_models[arch]
    base_digest = file_sha256(base_dir / "model.safetensors")
    splits = demo_splits(tmp_path / "splits", n_train=12, n_val=4)
    cfg = config_for(tmp_path, base_dir, max_steps=3, eval_steps=3, learning_rate=1e-2)
    tracker, events = RecordingTracker(), []

    result, model = student_training.fit(cfg, splits, tmp_path / "out", tracker=tracker,
                              report=lambda kind, data: events.append(kind))

    assert result.steps == result.max_steps == 3 and result.resumed_from_step is None
    assert math.isfinite(result.initial_val_loss) and result.best_val_loss is not None
    assert result.train_examples == 12 and result.val_examples == 4 and result.train_tokens > 0
    assert [s for s, _ in result.train_losses] == [1, 2, 3]
    assert file_sha256(base_dir / "model.safetensors") == base_digest
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    fresh_state = fresh.state_dict()
    lora_b = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            if "lora_B" in name:  # LoRA B starts at zero: any non-zero value was learned
                lora_b += 1
                assert param.abs().max() > 0, name
        else:
            assert not param.requires_grad
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(param, fresh_state[key], rtol=0, atol=0)
    assert lora_b == 14  # 7 linear layers x 2 decoder layers

    # The adapter on disk is the model in memory, and it passes the LoRA-server key check.
    assert student_model.check_adapter_keys(result.adapter_dir) == []
    reloaded = PeftModel.from_pretrained(fresh, result.adapter_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)

    saved = json.loads((tmp_path / "out" / student_training.RESULT).read_text())
    assert saved["steps"] == 3 and saved["adapter_dir"] == str(result.adapter_dir)
    assert {"start", "progress", "checkpoint", "done"} <= set(events)
    logged = {k for _, metrics in tracker.metrics for k in metrics}
    assert {"loss", "eval_loss", "learning_rate", "tokens_per_s"} <= logged


def test_loss_falls_on_a_repeated_batch(tmp_path, tiny_models):  # noqa: F811
    rows = demo_split_rows(3)
    # Two training rows fit one packed row: every step trains on the same batch.
    splits = write_splits(tmp_path / "splits", rows[:2], rows[2:])
    cfg = config_for(tmp_path, tiny_models["llama"], max_steps=6, eval_steps=6, learning_rate=1e-2,
                     lora={"r": 8, "alpha": 16}, early_stopping_patience=None)
    result = student_training.train_student(cfg, splits, tmp_path / "out")
    losses = [loss for _, loss in result.train_losses]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 4, losses


def test_early_stopping_ends_training_before_max_steps(tmp_path, tiny_models):  # noqa: F811
    splits = demo_splits(tmp_path / "splits", n_train=8, n_val=2)
    # No improvement can beat a threshold of 100, so the second evaluation exhausts patience 1.
    cfg = config_for(tmp_path, tiny_models["qwen2"], max_steps=20, eval_steps=1, micro_batch_size=1,
                     early_stopping_patience=1, early_stopping_threshold=100.0)
    result = student_training.train_student(cfg, splits, tmp_path / "out")
    assert result.stopped_early and result.steps == 2 and result.max_steps == 20
    best_step = min(result.val_losses, key=lambda sv: sv[1])[0]
    assert result.best_checkpoint.name == f"checkpoint-{best_step}"
    assert result.best_val_loss == min(loss for _, loss in result.val_losses)
    assert student_model.check_adapter_keys(result.adapter_dir) == []


def test_padded_batches_without_packing_train_too(tmp_path, tiny_models):  # noqa: F811
    splits = demo_splits(tmp_path / "splits", n_train=6, n_val=2)
    cfg = config_for(tmp_path, tiny_models["llama"], max_steps=2, eval_steps=2, packing=False,
                     micro_batch_size=3, lora={"target_modules": ["q_proj", "v_proj"]})
    result = student_training.train_student(cfg, splits, tmp_path / "out")
    assert result.steps == 2 and result.train_tokens > 0
    config = json.loads((result.adapter_dir / student_model.ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert student_model.check_adapter_keys(result.adapter_dir) == []


def _checkpoint(root, step, complete=True):
    path = root / student_training.CHECKPOINTS / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / student_model.ADAPTER_WEIGHTS).write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_resume_keeps_only_complete_checkpoints_of_the_same_run(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 2)
    student_training._prepare_output(out, "fp-1", resume=True)  # checkpoints of unknown origin are not resumed
    assert student_training.last_checkpoint(out) is None
    _checkpoint(out, 2)
    _checkpoint(out, 4)
    partial = _checkpoint(out, 6, complete=False)  # killed while saving
    notes = student_training._prepare_output(out, "fp-1", resume=True)
    assert not partial.exists() and any("incomplete checkpoint checkpoint-6" in n for n in notes)
    assert student_training.last_checkpoint(out).name == "checkpoint-4"
    # Same settings and data, unfinished: kept. Different fingerprint: removed.
    student_training._prepare_output(out, "fp-1", resume=True)
    assert student_training.last_checkpoint(out).name == "checkpoint-4"
    notes = student_training._prepare_output(out, "fp-2", resume=True)
    assert student_training.last_checkpoint(out) is None and "settings or data changed" in notes[0]
    # A finished run is not resumed: a new materialization trains again from the start.
    _checkpoint(out, 8)
    student_training._update_state(out, completed=True)
    notes = student_training._prepare_output(out, "fp-2", resume=True)
    assert student_training.last_checkpoint(out) is None and "the last run finished" in notes[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_answer_only_logits_give_the_same_loss_and_gradients(tiny_models, arch):  # noqa: F811
    from transformers import AutoTokenizer

    from distill_pipeline.stages import formatting

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    assert student_trainer.supports_logits_to_keep(model)
    rows = demo_split_rows(4)
    examples = [formatting.encode_example(tokenizer, r["input"], r["target"]) for r in rows]
    batch = formatting.PackedCollator(tokenizer.pad_token_id)(formatting.pack(examples, 256))
    batch.pop("real_tokens")
    results = []
    for selective in (False, True):
        model.zero_grad()
        total, count = student_trainer.answer_loss(model, batch, selective)
        (total / count).backward()
        results.append((total.detach(), count, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (full, n_full, g_full), (sel, n_sel, g_sel) = results
    assert n_full == n_sel == sum(len(e) - e.prompt_len for e in examples)
    torch.testing.assert_close(sel, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_sel, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_uses_bfloat16_base_and_float32_adapter(tmp_path, tiny_models):  # noqa: F811
    splits = demo_splits(tmp_path / "splits", n_train=8, n_val=2)
    cfg = config_for(tmp_path, tiny_models["qwen2"], max_steps=2, eval_steps=2, dtype="auto")
    result, model = student_training.fit(cfg, splits, tmp_path / "out")
    params = dict(model.named_parameters())
    base = next(p for n, p in params.items() if "lora_" not in n and p.ndim == 2)
    lora = next(p for n, p in params.items() if "lora_B" in n)
    assert base.device.type == "cuda" and lora.device.type == "cuda"
    if torch.cuda.is_bf16_supported():
        assert base.dtype == torch.bfloat16
    assert lora.dtype == torch.float32 and lora.abs().max() > 0
    assert result.steps == 2 and student_model.check_adapter_keys(result.adapter_dir) == []


def test_epoch_mode_evaluates_and_checkpoints_at_every_epoch_end(tmp_path, tiny_models):  # noqa: F811
    splits = demo_splits(tmp_path / "splits", n_train=6, n_val=2)
    cfg = config_for(tmp_path, tiny_models["llama"], epochs=2, micro_batch_size=1, max_seq_len=256)
    result = student_training.train_student(cfg, splits, tmp_path / "out")
    per_epoch = result.max_steps // 2
    assert result.epochs == 2 and result.steps == result.max_steps
    assert [step for step, _ in result.val_losses] == [per_epoch, 2 * per_epoch]
    assert result.best_checkpoint.name in (f"checkpoint-{per_epoch}", f"checkpoint-{2 * per_epoch}")


def test_train_settings_are_validated():
    from pydantic import ValidationError

    from distill_pipeline.config import TrainConfig

    with pytest.raises(ValidationError, match="must be a multiple of train.eval_steps"):
        TrainConfig(eval_steps=4, save_steps=6)
    with pytest.raises(ValidationError, match="needs train.eval_steps"):
        TrainConfig(save_steps=6)
    with pytest.raises(ValidationError, match="embedding/output layers are not LoRA targets"):
        TrainConfig(lora={"target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(lora_rank=8)
