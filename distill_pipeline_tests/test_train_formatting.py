"""Formatting, completion-only labels, padding-free packing and the adapter key check.

Real tokenizer (the demo model's, from its GGUF), tiny random Llama and Qwen2 models.
"""

import json

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_pipeline.stages import formatting, student_model
from distill_pipeline.stages.formatting import IGNORE_INDEX
from distill_pipeline_tests.train_support import demo_split_rows, demo_tokenizer_dir, tiny_models  # noqa: F401

INSTRUCTION = "Extract the corporate event as JSON."


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir):  # noqa: F811
    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


def _examples(tokenizer, n=3):
    rows = demo_split_rows(n)
    return [formatting.encode_example(tokenizer, r["input"], r["target"], INSTRUCTION, str(r["id"])) for r in rows]


def test_prompt_tokens_are_masked_and_the_answer_ends_with_eos(tokenizer):
    text, target = "Apex Holdings Inc. dismissed KPMG LLP on May 3, 2026.", '{"event_type":"dismissed_auditor"}'
    ex = formatting.encode_example(tokenizer, text, target, INSTRUCTION)
    prompt = formatting.encode_prompt(tokenizer, text, INSTRUCTION)
    n = len(prompt)
    assert ex.input_ids[:n] == prompt  # the prompt at inference is exactly the trained prompt
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:] and ex.prompt_len == n
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[n:]) == target + tokenizer.eos_token
    shown = tokenizer.decode(prompt)
    assert INSTRUCTION in shown and text in shown and shown.rstrip().endswith("assistant")
    # Without an instruction the user turn is the raw input only.
    bare = tokenizer.decode(formatting.encode_prompt(tokenizer, text, None))
    assert INSTRUCTION not in bare and f"user\n{text}<|im_end|>" in bare


def test_packed_rows_mask_every_example_start_and_keep_all_answer_tokens(tokenizer):
    examples = _examples(tokenizer, 4)
    bins = formatting.pack(examples, capacity=max(len(e) for e in examples) * 2)
    assert sorted(e.row_id for b in bins for e in b) == sorted(e.row_id for e in examples)
    batch = formatting.PackedCollator(tokenizer.pad_token_id)(bins)
    labels, pos = batch["labels"], batch["position_ids"]
    starts = (pos == 0).nonzero().tolist()
    assert all(labels[r, c].item() == IGNORE_INDEX for r, c in starts)
    answer_tokens = sum(len(e) - e.prompt_len for e in examples)
    assert int((labels != IGNORE_INDEX).sum()) == answer_tokens
    assert batch["real_tokens"] == sum(len(e) for e in examples)


def test_pack_fills_bins_without_exceeding_capacity(tokenizer):
    examples = _examples(tokenizer, 12)
    capacity = 256
    bins = formatting.pack(examples, capacity)
    assert all(sum(len(e) for e in b) <= capacity for b in bins)
    assert sum(len(b) for b in bins) == len(examples)
    assert len(bins) < len(examples)  # several examples share a row
    with pytest.raises(ValueError, match="more than the row size"):
        formatting.pack(examples, capacity=10)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_across_boundaries(tiny_models, tokenizer, arch, attn):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation=attn).eval()
    examples = _examples(tokenizer, 3)
    batch = formatting.PackedCollator(tokenizer.pad_token_id)([examples])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]
        # Negative controls: the same row with running positions, or with a cache (which makes
        # transformers skip packed-sequence detection), lets later examples see earlier ones.
        running = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    offset = 0
    for i, (ex, ref) in enumerate(zip(examples, alone)):
        part = slice(offset, offset + len(ex))
        torch.testing.assert_close(packed[part], ref, rtol=1e-4, atol=1e-4)
        if i > 0:
            assert (running[part] - ref).abs().max() > 1e-3
            assert (cached[part] - ref).abs().max() > 1e-3
        offset += len(ex)


def test_bad_rows_are_skipped_with_a_reason(tokenizer):
    rows = demo_split_rows(3)
    table = pa.table({
        "id": [1, 2, 3, 4, 5],
        "input": [rows[0]["input"], None, "  ", rows[1]["input"], rows[2]["input"] * 40],
        "target": [rows[0]["target"], rows[1]["target"], rows[1]["target"], None, rows[2]["target"]],
    })
    examples, skipped = formatting.encode_rows(tokenizer, table, None, max_seq_len=256)
    assert [e.row_id for e in examples] == ["1"]
    reasons = {s.row_id: s.reason for s in skipped}
    assert reasons["2"] == reasons["3"] == "input is null or empty"
    assert reasons["4"] == "target is null or empty"
    assert "train.max_seq_len=256" in reasons["5"]


def test_a_split_without_the_needed_columns_is_refused(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [1], "input": ["x"]}), path)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['target'\]") as err:
        formatting.read_split(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="dataset_splits"):
        formatting.read_split(tmp_path / "missing.parquet")


# --- adapter keys ------------------------------------------------------------------------------


@pytest.fixture()
def saved_adapter(tiny_models, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    targets = student_model.lora_target_modules(base, "all-linear")
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    keys = student_model.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", keys


def _rewrite(adapter, rename=None, extra=None, config=None):
    path = adapter / student_model.ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        tensors = {(rename(k) if rename else k): fh.get_tensor(k) for k in fh.keys()}
    tensors.update(extra or {})
    save_file(tensors, str(path))
    if config:
        cfg_path = adapter / student_model.ADAPTER_CONFIG
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))


def test_saved_adapter_passes_the_lora_server_key_check(saved_adapter):
    adapter, keys = saved_adapter
    assert student_model.check_adapter_keys(adapter) == []
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".default." not in k for k in keys)
    config = json.loads((adapter / student_model.ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] is None and config["r"] == 4
    assert "embed_tokens" not in " ".join(keys) and "lm_head" not in " ".join(keys)


def test_key_check_catches_what_servers_reject(saved_adapter):
    adapter, _ = saved_adapter
    _rewrite(adapter, rename=lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight"))
    problems = student_model.check_adapter_keys(adapter)
    assert problems and all("adapter name left in the key" in p for p in problems if "lora_A.default" in p)
    assert any("needs both lora_A and lora_B" in p for p in problems)


def test_key_check_catches_unmapped_modules_and_modules_to_save(saved_adapter):
    adapter, _ = saved_adapter
    _rewrite(adapter,
             extra={"base_model.model.model.layers.0.mlp.c_fc.lora_A.weight": torch.zeros(4, 32),
                    "base_model.model.model.layers.0.mlp.c_fc.lora_B.weight": torch.zeros(64, 4),
                    "base_model.model.lm_head.weight": torch.zeros(8, 32)},
             config={"modules_to_save": ["lm_head"]})
    problems = " | ".join(student_model.check_adapter_keys(adapter))
    assert "'c_fc' is not one a LoRA server maps" in problems
    assert "base_model.model.lm_head.weight: not a lora_A/lora_B weight" in problems
    assert "modules_to_save=['lm_head']" in problems
    assert "['c_fc'] which adapter_config target_modules" in problems
