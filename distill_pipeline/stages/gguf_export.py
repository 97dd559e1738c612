"""A merged Hugging Face model directory -> one GGUF file that llama.cpp loads.

Written from the directory alone (config.json, *.safetensors, tokenizer.json/tokenizer_config.json
with the chat template), for `LlamaForCausalLM` and `Qwen2ForCausalLM`:

- Tensors get llama.cpp's names (token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down,
  attn_norm, ffn_norm, output_norm, output). With tied embeddings no `output` is written:
  llama.cpp then reads the output head from token_embd.
- Llama's Q and K rows are permuted: Hugging Face applies rotary embeddings to the two halves of
  a head (rotate_half), llama.cpp's llama graph to adjacent pairs, so each head's rows are
  interleaved to match. Qwen2 runs the "neox" (half-split) rope in llama.cpp: no permutation.
- Out types F32, F16, BF16, Q8_0, Q5_0, Q4_0 (quantized with gguf-py's numpy reference code,
  `gguf.quants`, bit-compatible with ggml's). 1-D tensors (norms, biases) stay F32, as llama.cpp's
  own converter keeps them. A 2-D tensor whose rows are not whole 32-value blocks is written F16
  (what convert_hf_to_gguf.py and llama-quantize do) and listed in `GgufInfo.fallback_tensors`;
  `strict=True` raises instead.
- The tokenizer is written as a llama.cpp BPE ("gpt2") vocabulary, with a pre-tokenizer name chosen
  from the tokenizer.json pre-tokenizer (`PRE_TOKENIZERS`); an unknown one is an error unless the
  caller names it (`tokenizer_pre=`). The chat template is embedded (`tokenizer.chat_template`).

The file is written to a temporary name and renamed, so a crash never leaves a half file behind.
torch, transformers and gguf are imported inside functions: stages are imported by Dagster code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from distill_pipeline.clients.tracking import file_sha256

log = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0")
QUANTIZED_TYPES = ("Q8_0", "Q5_0", "Q4_0")
BLOCK_SIZE = 32  # values per block of Q8_0, Q5_0 and Q4_0

# Hugging Face regexes of the Split pre-tokenizers llama.cpp has a pre-tokenizer type for. These
# strings are what the models' own tokenizer.json files contain.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex
            and not step.get("add_prefix_space", False))


def _split(step: dict, regex: str) -> bool:
    return step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex") == regex


# llama.cpp pre-tokenizer name -> does this tokenizer.json pre_tokenizer split text the same way?
# Each name's regex in llama.cpp (llama-vocab.cpp) is the one the Hugging Face steps amount to.
PRE_TOKENIZERS = {
    # ByteLevel with its built-in GPT-2 regex. This is also what transformers builds when it reads
    # a GGUF tokenizer, whatever the GGUF's pre-tokenizer was (the demo base, read from a GGUF).
    "gpt-2": lambda steps: len(steps) == 1 and _byte_level(steps[0], use_regex=True),
    # SmolLM/SmolLM2 (as published): every digit on its own, then the GPT-2 regex.
    "smollm": lambda steps: (len(steps) == 2 and steps[0].get("type") == "Digits"
                             and steps[0].get("individual_digits") is True
                             and _byte_level(steps[1], use_regex=True)),
    "qwen2": lambda steps: (len(steps) == 2 and _split(steps[0], _QWEN2_REGEX)
                            and _byte_level(steps[1], use_regex=False)),
    "llama-bpe": lambda steps: (len(steps) == 2 and _split(steps[0], _LLAMA3_REGEX)
                                and _byte_level(steps[1], use_regex=False)),
}

# Token types of a llama.cpp vocabulary (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    size_bytes: int
    out_type: str
    sha256: str
    architecture: str  # llama.cpp's name: "llama" or "qwen2"
    tensor_count: int
    tokenizer_pre: str
    fallback_tensors: tuple[str, ...] = ()  # written F16: rows not whole quantization blocks

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["fallback_tensors"] = list(self.fallback_tensors)
        return data


def write_gguf(model_dir: Path, out_path: Path, out_type: str = "F16", *, tokenizer_pre: str | None = None,
               strict: bool = False, permute_qk: bool = True) -> GgufInfo:
    """Write the model in `model_dir` as a GGUF of `out_type` at `out_path`.

    tokenizer_pre: llama.cpp's pre-tokenizer name, when the tokenizer's is not one `PRE_TOKENIZERS`
    recognises. strict: raise on a tensor the out type's blocks do not fit instead of writing it F16.
    permute_qk=False writes a deliberately broken llama file (tests prove the parity gate fails).
    """
    import gguf

    out_type = out_type.upper()
    if out_type not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF out type {out_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"{model_dir}: architectures={archs}; GGUF export supports {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[archs[0]]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(model_dir.name)
        writer.add_file_type(_file_type(out_type))
        if out_type in QUANTIZED_TYPES:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        n_vocab = _add_hparams(writer, config, arch)
        pre = _add_tokenizer(writer, model_dir, n_vocab, tokenizer_pre)
        count, fallback = 0, []
        for name, data in _gguf_tensors(model_dir, config, arch, permute_qk):
            qtype, packed = _encode(name, data, out_type, strict)
            if qtype == gguf.GGMLQuantizationType.F16 and out_type in QUANTIZED_TYPES:
                fallback.append(name)
            writer.add_tensor(name, packed, raw_dtype=qtype)
            count += 1
        if fallback:
            log.warning("GGUF %s: %d tensor(s) written F16, their rows are not whole %d-value blocks: %s",
                        out_type, len(fallback), BLOCK_SIZE, ", ".join(fallback))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GgufInfo(path=out_path, size_bytes=out_path.stat().st_size, out_type=out_type,
                    sha256=file_sha256(out_path), architecture=arch, tensor_count=count,
                    tokenizer_pre=pre, fallback_tensors=tuple(fallback))


def _file_type(out_type: str) -> int:
    import gguf

    t = gguf.LlamaFileType
    return {"F32": t.ALL_F32, "F16": t.MOSTLY_F16, "BF16": t.MOSTLY_BF16, "Q8_0": t.MOSTLY_Q8_0,
            "Q5_0": t.MOSTLY_Q5_0, "Q4_0": t.MOSTLY_Q4_0}[out_type]


def rope_theta(config: dict) -> float:
    """Rope base: transformers 5 keeps it in rope_parameters["rope_theta"], older configs in rope_theta."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has no rope theta (rope_parameters.rope_theta or rope_theta)")
    return float(theta)


def _add_hparams(writer: Any, config: dict, arch: str) -> int:
    """The keys llama.cpp reads for these architectures; returns the vocabulary size (embedding rows)."""
    import gguf

    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        # llama3/yarn/dynamic scaling need extra keys (and a rope_freqs tensor for llama3).
        raise ValueError(f"rope_type={rope_type!r} is not supported by the GGUF export (default, linear)")
    if config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: llama.cpp's qwen2 graph has no sliding-window attention")
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or n_embd // n_head
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)  # GQA: fewer K/V heads
    if head_dim != n_embd // n_head:  # llama.cpp assumes hidden/heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    return int(config["vocab_size"])


def detect_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer`, or None if unknown."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    return next((name for name, matches in PRE_TOKENIZERS.items() if matches(steps or [])), None)


def _add_tokenizer(writer: Any, model_dir: Path, n_vocab: int, tokenizer_pre: str | None) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise ValueError(f"{model_dir}: only byte-level BPE tokenizers are exported (got "
                         f"{spec['model'].get('type')}, byte_fallback={spec['model'].get('byte_fallback')})")
    pre = tokenizer_pre or detect_pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        raise ValueError(
            f"{model_dir}: the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} is not one "
            f"this export recognises ({', '.join(PRE_TOKENIZERS)}); pass tokenizer_pre= with the llama.cpp "
            "pre-tokenizer name that splits text the same way")

    vocab = tokenizer.get_vocab()  # includes added tokens
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding has {n_vocab} rows")
    # llama.cpp sizes its vocabulary from this list, which must match the embedding rows: ids the
    # tokenizer does not use (padding rows) become unused placeholder tokens.
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, _NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        # Special added tokens are control tokens (parsed from text only when asked, never
        # printed); the others user-defined (always matched whole, printed), as in Hugging Face.
        tokens[i], types[i] = added.content, _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(int(token_id))
    # Whether encoding adds BOS/EOS, as the tokenizer actually does it (llama.cpp guesses otherwise).
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template to embed")
    writer.add_chat_template(template)
    return pre


def _state_dict(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, float32 numpy array) for every tensor in the directory's safetensors files."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                # via torch: numpy has no bfloat16, the dtype merged models are often saved in
                yield name, fh.get_tensor(name).to(torch.float32).numpy()


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _permute(w: Any, n_head: int) -> Any:
    """Reorder each head's rows from half-split (Hugging Face rope) to interleaved pairs (llama.cpp)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model_dir: Path, config: dict, arch: str, permute_qk: bool) -> Iterator[tuple[str, Any]]:
    tied = bool(config.get("tie_word_embeddings", False))
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    has_output = False
    for name, data in _state_dict(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the rope keys
        if name == "model.embed_tokens.weight":
            yield "token_embd.weight", data
        elif name == "model.norm.weight":
            yield "output_norm.weight", data
        elif name == "lm_head.weight":
            if not tied:  # a tied head, if saved at all, is the embedding again
                has_output = True
                yield "output.weight", data
        elif match := _LAYER.fullmatch(name):
            layer, rest = match.groups()
            module, _, kind = rest.rpartition(".")
            if module not in _LAYER_NAMES or kind not in ("weight", "bias"):
                raise ValueError(f"{name}: no llama.cpp tensor for it in a {arch} model")
            if arch == "llama" and permute_qk and module in ("self_attn.q_proj", "self_attn.k_proj"):
                data = _permute(data, n_head if module == "self_attn.q_proj" else n_kv)
            yield f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}", data
        else:
            raise ValueError(f"{name}: no llama.cpp tensor for it in a {arch} model")
    if not tied and not has_output:
        raise ValueError(f"{model_dir}: tie_word_embeddings is false but there is no lm_head.weight")


def _encode(name: str, data: Any, out_type: str, strict: bool) -> tuple[Any, Any]:
    """(ggml type, array to write) for one tensor."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if data.ndim <= 1 or out_type == "F32":  # norms and biases: tiny, and precision-sensitive
        return Q.F32, np.ascontiguousarray(data, dtype=np.float32)
    if out_type == "F16":
        return Q.F16, data.astype(np.float16)
    qtype = Q[out_type]
    if out_type in QUANTIZED_TYPES and data.shape[-1] % BLOCK_SIZE:
        message = (f"{name} has shape {tuple(data.shape)}: its rows of {data.shape[-1]} values are not whole "
                   f"{BLOCK_SIZE}-value blocks, which {out_type} needs")
        if strict:
            raise ValueError(message)
        log.warning("%s; writing it F16", message)
        return Q.F16, data.astype(np.float16)
    return qtype, quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)



