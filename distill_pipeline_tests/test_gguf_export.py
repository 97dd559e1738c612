"""GGUF export and its parity gate, on tiny random Llama / Qwen2 models, through llama.cpp (xllamacpp)
and through transformers reading the GGUF.

The tokenizer is a real byte-level BPE trained here in a fraction of a second on text with digits,
whitespace runs and the chat special tokens, with a ChatML chat template. The demo tokenizer
(train_support) would do too, but its 49k-token vocabulary makes transformers' GGUF reader spend
~25 s parsing it per check; with ~600 tokens a parity check takes ~2 s. The models follow
train_support.make_tiny_model (2 layers, GQA with 4 query / 2 KV heads), with tied or untied
embeddings and a rope theta that is not the default, so reading it from transformers 5's
rope_parameters is checked.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from distill_pipeline.stages.gguf_export import SUPPORTED_TYPES, detect_pre_tokenizer, write_gguf
from distill_pipeline.stages.gguf_parity import PROBES, LlamaCppServer, ParityFloors, check_parity

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPTS = ["Acme buys Beta for $12.5M on 2024-03-05.", "hello  there", "What is 2+2?\tAnd 3 + 4?",
           "  spaced out\n\ntext 007"]
ROPE_THETA = 50000.0


def _corpus():
    rng = random.Random(0)
    words = ("the a merger of acme beta corp buys sells for on in at to date amount event type shares year "
             "quarter report said will was").split()
    for _ in range(3000):
        parts = [rng.choice(words) if (r := rng.random()) < 0.6 else str(rng.randint(0, 99999)) if r < 0.8
                 else rng.choice([",", ".", "$", "%", "-", '"', ":", "{", "}"]) for _ in range(rng.randint(3, 12))]
        yield rng.choice([" ", "  ", "   ", "\t", "\n", " \n  "]).join(parts)
    yield from PROBES


def build_tokenizer(folder: Path, pre: str = "gpt-2") -> Path:
    """A ~600-token byte-level BPE with ChatML specials; pre="smollm" splits digits first (SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)  # merges include "Ġ1", "ĠĠ", digit pairs: the probes matter
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return folder


def tiny_model(arch: str, tokenizer_dir: Path, folder: Path, tied: bool = True, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied, initializer_range=0.2,
                  rope_theta=ROPE_THETA)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if arch == "qwen2":  # random q/k/v biases (they start at zero), so writing them is checked
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    tok = build_tokenizer(root / "tok")
    smollm_tok = build_tokenizer(root / "tok-smollm", pre="smollm")
    return {
        "llama-tied": tiny_model("llama", tok, root / "llama-tied"),
        "llama-untied": tiny_model("llama", tok, root / "llama-untied", tied=False, seed=1),
        "qwen2-untied": tiny_model("qwen2", tok, root / "qwen2-untied", tied=False, seed=2),
        "qwen2-tied": tiny_model("qwen2", tok, root / "qwen2-tied", seed=3),
        "llama-smollm": tiny_model("llama", smollm_tok, root / "llama-smollm", seed=4),
        "llama-48": tiny_model("llama", tok, root / "llama-48", hidden=48, seed=5),
    }


def _metadata(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.")
              or name in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                          "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")}
    fields["token_types"] = reader.fields["tokenizer.ggml.token_type"].contents()
    fields["tokens"] = reader.fields["tokenizer.ggml.tokens"].contents()
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-untied"])
def test_metadata_and_tensors_are_what_llama_cpp_reads(models, tmp_path, name):
    import hashlib
    import json

    model_dir = models[name]
    arch, tied = name.split("-")[0], name.endswith("-tied")
    info = write_gguf(model_dir, tmp_path / "m.gguf", "F16")
    assert info.size_bytes == info.path.stat().st_size
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert (info.architecture, info.tokenizer_pre) == (arch, "gpt-2" if arch == "llama" else "qwen2")

    fields, tensors = _metadata(info.path)
    config = json.loads((model_dir / "config.json").read_text())
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.context_length"] == 512 and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.embedding_length"] == 32 and fields[f"{arch}.feed_forward_length"] == 64
    assert (fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]) == (4, 2)
    assert fields[f"{arch}.rope.freq_base"] == ROPE_THETA == config["rope_parameters"]["rope_theta"]
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert fields[f"{arch}.vocab_size"] == config["vocab_size"] == len(fields["tokens"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == CHATML
    specials = {t: fields["token_types"][i] for i, t in enumerate(fields["tokens"]) if t.startswith("<|")}
    assert specials == {"<|endoftext|>": 3, "<|im_start|>": 3, "<|im_end|>": 3}  # control tokens
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokens"].index("<|im_end|>")

    assert ("output.weight" in tensors) is not tied  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"] == ("F16", [32, config["vocab_size"]])
    assert tensors["blk.0.attn_q.weight"] == ("F16", [32, 32])
    assert tensors["blk.1.attn_k.weight"] == ("F16", [32, 16])  # 2 KV heads of 8
    assert tensors["blk.0.attn_norm.weight"][0] == tensors["output_norm.weight"][0] == "F32"
    assert ("blk.0.attn_q.bias" in tensors) is (arch == "qwen2")
    if arch == "qwen2":
        assert tensors["blk.0.attn_k.bias"] == ("F32", [16])
    per_layer = 9 + (3 if arch == "qwen2" else 0)
    assert info.tensor_count == len(tensors) == 2 * per_layer + 2 + (0 if tied else 1)


@pytest.mark.parametrize("name,out_type", [("llama-tied", "F16"), ("llama-untied", "F32"), ("qwen2-untied", "F16"),
                                           ("qwen2-tied", "BF16")])
def test_float_export_decodes_like_the_merged_model(models, tmp_path, name, out_type):
    info = write_gguf(models[name], tmp_path / f"{name}.gguf", out_type)
    report = check_parity(info.path, models[name], PROMPTS, max_new_tokens=12, out_type=out_type)
    assert report.failures() == []
    # outputs differ only after a near-tie the rounding of F16/BF16 flipped (random tiny models have many)
    assert all(d["hf_margin"] is not None and d["hf_margin"] < ParityFloors().tie_margin for d in report.divergences)
    if out_type == "F32":
        assert report.greedy_exact_llamacpp == report.greedy_exact_reader == 1.0
    assert report.strings_tokenized == len(PROMPTS) + len(PROBES)
    assert report.token_mismatches == report.reader_token_mismatches == report.template_mismatches == []
    assert report.positions > 0 and report.max_logprob_diff < 0.1
    assert set(report.as_dict()) >= {"greedy_exact_llamacpp", "mean_logprob_diff", "confident_agreement"}


def test_quantized_exports_meet_their_floors_and_degrade_in_order(models, tmp_path):
    errors = {}
    for out_type in ("Q8_0", "Q5_0", "Q4_0"):
        info = write_gguf(models["qwen2-untied"], tmp_path / f"{out_type}.gguf", out_type)
        report = check_parity(info.path, models["qwen2-untied"], PROMPTS, max_new_tokens=12, out_type=out_type)
        assert report.token_mismatches == [] and report.positions > 0
        errors[out_type] = report.mean_logprob_diff
        if out_type == "Q8_0":
            assert report.failures() == []
            _, tensors = _metadata(info.path)
            assert tensors["blk.0.ffn_down.weight"][0] == "Q8_0" and tensors["blk.0.attn_q.bias"][0] == "F32"
    # fewer bits, further from the merged model: random 32-wide rows are harsh on 4 bits
    assert errors["Q8_0"] < errors["Q5_0"] < errors["Q4_0"]
    strict = ParityFloors(max_mean_logprob_diff=errors["Q4_0"] / 2)
    assert any("mean |logprob difference|" in reason for reason in report.failures(strict))


def test_unpermuted_llama_fails_the_gate(models, tmp_path):
    """Writing Llama's Q/K rows without the rope permutation loads fine and decodes garbage: the gate says so."""
    info = write_gguf(models["llama-tied"], tmp_path / "broken.gguf", "F32", permute_qk=False)
    report = check_parity(info.path, models["llama-tied"], PROMPTS, max_new_tokens=12, out_type="F32")
    reasons = report.failures()
    assert report.token_mismatches == []  # the vocabulary is fine, the attention is not
    assert any(r.startswith("greedy (F32): llama.cpp decoded") for r in reasons), reasons
    assert any(r.startswith("greedy (F32): transformers-from-GGUF") for r in reasons), reasons
    assert report.greedy_exact_llamacpp < 0.99 and report.max_logprob_diff > 0.1
    # judged as a quantized file, the logprob floors fail it as well
    as_quantized = dataclasses.replace(report, out_type="Q8_0")
    assert any("logprob" in r or "top-" in r for r in as_quantized.failures()), as_quantized.failures()


def test_pre_tokenizer_is_chosen_from_the_tokenizer(models, tmp_path):
    assert detect_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    assert detect_pre_tokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}) == "smollm"
    assert detect_pre_tokenizer({"type": "Whitespace"}) is None

    # SmolLM2's digit splitting: written "smollm", llama.cpp tokenizes like the merged tokenizer.
    info = write_gguf(models["llama-smollm"], tmp_path / "smollm.gguf", "F32")
    assert info.tokenizer_pre == "smollm"
    report = check_parity(info.path, models["llama-smollm"], PROMPTS, max_new_tokens=4, out_type="F32")
    assert report.token_mismatches == [] and report.failures() == []
    # transformers rebuilds a GGUF vocabulary without the digit split: reported, not gated by default
    assert report.reader_token_mismatches
    gated = report.failures(ParityFloors(max_reader_token_mismatches=0))
    assert len(gated) == 1 and gated[0].startswith("GGUF reader tokenizer: "), gated

    # A wrong name loads, and the probes catch it.
    wrong = write_gguf(models["llama-tied"], tmp_path / "wrong.gguf", "F32", tokenizer_pre="smollm")
    reasons = check_parity(wrong.path, models["llama-tied"], PROMPTS, max_new_tokens=4, out_type="F32").failures()
    assert any(r.startswith("tokenizer: ") for r in reasons), reasons


def test_unknown_pre_tokenizer_needs_a_name(models, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(models["llama-tied"], model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"pre-tokenizer .*Whitespace.* not one this export recognises.*tokenizer_pre="):
        write_gguf(model_dir, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))  # no half file left
    assert write_gguf(model_dir, tmp_path / "x.gguf", tokenizer_pre="gpt-2").tokenizer_pre == "gpt-2"


def test_unsupported_type_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match=r"'Q4_K_M' is not supported; supported: F32, F16, BF16, Q8_0, Q5_0, Q4_0"):
        write_gguf(models["llama-tied"], tmp_path / "x.gguf", "Q4_K_M")
    assert SUPPORTED_TYPES == ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0")


def test_rows_the_block_size_does_not_divide(models, tmp_path):
    """hidden_size 48: rows of 48 values are not whole 32-value blocks."""
    model_dir = models["llama-48"]
    with pytest.raises(ValueError, match=r"token_embd\.weight has shape \(\d+, 48\): its rows of 48 values are not "
                                         r"whole 32-value blocks, which Q8_0 needs"):
        write_gguf(model_dir, tmp_path / "strict.gguf", "Q8_0", strict=True)

    # Default, as llama.cpp's converter and llama-quantize do: those tensors go F16, the rest Q8_0.
    info = write_gguf(model_dir, tmp_path / "q8.gguf", "Q8_0")
    assert "token_embd.weight" in info.fallback_tensors and "blk.0.attn_q.weight" in info.fallback_tensors
    assert "blk.0.ffn_down.weight" not in info.fallback_tensors  # rows of 64
    _, tensors = _metadata(info.path)
    assert tensors["token_embd.weight"][0] == "F16" and tensors["blk.0.ffn_down.weight"][0] == "Q8_0"
    with LlamaCppServer(info.path, n_ctx=128) as llama:
        assert len(llama.generate(llama.tokenize("hello 12"), 3)) == 3
