"""Training throughput on CPU: our path ÷ a plain transformers Trainer with padded batches, and ÷ TRL's SFTTrainer.

All train the same LoRA (r=16, all-linear) on the same base model and the same examples (demo
SEC sentences -> JSON, formatted through the model's chat template, loss on the answer only),
for one epoch each, timed by the Trainer's own train_runtime. Throughput counts real tokens
only (never padding), prompt and answer alike: ours counts them in the collator, the baseline
through `include_num_input_tokens_seen="non_padding"` (attention-mask sums), TRL through
`include_num_input_tokens_seen="all"` (every input id: its padding-free rows hold no padding).
The totals of every run are checked equal.

- ours:          packed rows of up to --seq-len tokens, per-example position ids, no padding,
                 logits only where an answer token is predicted (stages/student_trainer.py)
- packing only:  ours without the answer-only logits (shows what each part brings)
- HF Trainer:    transformers.Trainer + DataCollatorForSeq2Seq (pads each batch to its longest)
- TRL:           trl.SFTTrainer, packing=True, packing_strategy="bfd", padding_free=True
                 (one packed row of up to --seq-len tokens per step, like ours), completion_only_loss=True,
                 given the same chat-formatted text as standard prompt/completion rows; its tokenization
                 is checked to give exactly our token ids and labels. SFTConfig's own defaults that differ
                 from TrainingArguments' are set as ours runs: no gradient checkpointing, float32 (bf16=False).
                 Its loss goes through TRL's fused LM head (chunked log-probabilities).

Model: the demo student, SmolLM2-135M-Instruct (its GGUF dequantized to float32), unless --model
names another Hugging Face model directory. TRL is an optional bench dependency:

    .venv/bin/pip install -e .[bench]    # trl
    .venv/bin/python bench/train.py [--examples 64] [--repeats 3] [--batch-size 8] [--seq-len 512]
                                    [--threads N] [--skip-trl]

Last line: one JSON object (ratio_vs_hf_trainer, ratio_vs_trl, tokens_per_s, trl_tokens_per_s, ...);
ratio_vs_trl and the other TRL fields are null with --skip-trl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Python puts this script's folder first on sys.path, where bench/gguf.py would shadow the gguf package
# that transformers reads the demo GGUF with (the first conversion failed with an ImportError).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distill_pipeline.config import BaseModelConfig  # noqa: E402
from distill_pipeline.demo.data import clean_examples  # noqa: E402
from distill_pipeline.stages import formatting, student_model  # noqa: E402
from distill_pipeline.stages.tasks import canonical_json  # noqa: E402
from distill_pipeline.stages.student_trainer import make_trainer_class, supports_logits_to_keep  # noqa: E402


def demo_rows(n: int, seed: int = 11) -> list[tuple[str, str, str]]:
    # (row id, input, target); canonical_json(answer) is the form curation gives dataset_splits
    return [(str(i), row.sentence, canonical_json(row.answer)) for i, row in clean_examples(n, seed=seed)]


def demo_examples(tokenizer, rows) -> list[formatting.Example]:
    return [formatting.encode_example(tokenizer, text, target, row_id=rid) for rid, text, target in rows]


def trl_texts(tokenizer, rows) -> list[dict[str, str]]:
    """The same chat-formatted text ours trains on, as TRL's (standard) prompt-completion rows.

    prompt: the chat template up to where the answer starts; completion: the assistant turn up to
    and including its end-of-turn token (what formatting.encode_example labels). run_trl checks
    that TRL's tokenization of these gives exactly our token ids and labels.
    """
    out = []
    for _, text, target in rows:
        prompt = formatting.prompt_text(tokenizer, text)
        full = tokenizer.apply_chat_template([{"role": "user", "content": text},
                                              {"role": "assistant", "content": target}], tokenize=False)
        answer = full[len(prompt):]
        eos = tokenizer.eos_token
        out.append({"prompt": prompt, "completion": answer[:answer.rindex(eos) + len(eos)] if eos in answer
                    else answer + eos})
    return out


def lora_model(location: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(0)
    base = student_model.load_model(location, torch.float32)
    base.config.use_cache = False
    targets = student_model.lora_target_modules(base, "all-linear")
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                           task_type="CAUSAL_LM"))


def common_args(out: str, batch_size: int, args_class=None, **extra):
    from transformers import TrainingArguments

    return (args_class or TrainingArguments)(
        output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=2e-4,
        lr_scheduler_type="constant", save_strategy="no", eval_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0, **extra)


def run_ours(location: str, tokenizer, examples, seq_len: int, selective: bool, out: str) -> dict:
    from transformers import PrinterCallback

    bins = formatting.pack(examples, seq_len, seed=0)
    model = lora_model(location)
    collate = formatting.PackedCollator(tokenizer.pad_token_id)
    trainer = make_trainer_class()(
        model=model, args=common_args(out, 1, remove_unused_columns=False), train_dataset=bins,
        data_collator=collate, eval_items=[], collate=collate,
        selective=selective and supports_logits_to_keep(model.get_base_model()),
    )
    trainer.remove_callback(PrinterCallback)
    metrics = trainer.train().metrics
    tokens = trainer.tokens_seen
    return {"seconds": metrics["train_runtime"], "tokens": tokens, "steps": trainer.state.global_step,
            "tokens_per_s": tokens / metrics["train_runtime"], "rows": len(bins),
            "row_fill": round(tokens / (len(bins) * seq_len), 3)}


def run_hf(location: str, tokenizer, examples, batch_size: int, out: str) -> dict:
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer

    data = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in examples]
    model = lora_model(location)
    trainer = Trainer(model=model, args=common_args(out, batch_size, include_num_input_tokens_seen="non_padding"),
                      train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.remove_callback(PrinterCallback)
    metrics = trainer.train().metrics
    tokens = trainer.state.num_input_tokens_seen
    padded = sum(max(len(e) for e in examples[i:i + batch_size]) * len(examples[i:i + batch_size])
                 for i in range(0, len(examples), batch_size))  # upper bound: the sampler shuffles
    return {"seconds": metrics["train_runtime"], "tokens": tokens, "steps": trainer.state.global_step,
            "tokens_per_s": tokens / metrics["train_runtime"], "pad_share_unshuffled": round(1 - tokens / padded, 3)}


def run_trl(location: str, tokenizer, texts, examples, seq_len: int, out: str) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    model = lora_model(location)
    # SFTConfig's own defaults differ from TrainingArguments' (gradient checkpointing on, bf16 on): set both
    # as ours runs (no checkpointing, float32). include_num_input_tokens_seen="all" counts every input id;
    # padding-free rows of one packed bin carry no padding (checked below: the total is the real tokens).
    config = common_args(out, 1, SFTConfig, max_length=seq_len, packing=True, packing_strategy="bfd",
                         padding_free=True, completion_only_loss=True, gradient_checkpointing=False, bf16=False,
                         include_num_input_tokens_seen="all")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(texts), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    seqs = sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    trl_seqs = []
    for row in trainer.train_dataset:
        start = 0
        for n in row["seq_lengths"]:
            trl_seqs.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    if sorted(trl_seqs) != seqs:
        raise SystemExit("TRL tokenized the examples differently from ours: the comparison would not be fair")
    metrics = trainer.train().metrics
    tokens = trainer.state.num_input_tokens_seen
    rows = len(trainer.train_dataset)
    return {"seconds": metrics["train_runtime"], "tokens": tokens, "steps": trainer.state.global_step,
            "tokens_per_s": tokens / metrics["train_runtime"], "rows": rows,
            "row_fill": round(tokens / (rows * seq_len), 3)}


def _trl_version() -> str:
    import trl

    return trl.__version__


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each path; the best counts")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step of the HF Trainer baseline")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per packed row of ours and of TRL (its max_length)")
    parser.add_argument("--model", help="a Hugging Face model directory (default: the demo SmolLM2-135M)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core); 1 keeps "
                        "a shared machine's other jobs from stalling a step's threads at their barriers")
    parser.add_argument("--skip-trl", action="store_true", help="leave out TRL's SFTTrainer (needs .[bench])")
    parser.add_argument("--home", default=os.environ.get("DISTILL_HOME", str(REPO / ".distill")),
                        help="where the demo GGUF is converted once (base_models/)")
    args = parser.parse_args()
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("bench/train.py: TRL is not installed; pip install -e .[bench] (or pass --skip-trl)")

    if args.threads:
        torch.set_num_threads(args.threads)
    location = args.model or student_model.prepare_base(BaseModelConfig(), BaseModelConfig().cache_root())
    tokenizer = student_model.load_tokenizer(location)
    rows = demo_rows(args.examples)
    examples = demo_examples(tokenizer, rows)
    texts = trl_texts(tokenizer, rows)
    lengths = [len(e) for e in examples]
    print(f"model {location}\n{len(examples)} examples, {sum(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f},"
          f" min {min(lengths)}, max {max(lengths)}), torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "ours": lambda: run_ours(location, tokenizer, examples, args.seq_len, True, tmp),
            "hf_trainer": lambda: run_hf(location, tokenizer, examples, args.batch_size, tmp),
            "packing_only": lambda: run_ours(location, tokenizer, examples, args.seq_len, False, tmp),
        }
        if not args.skip_trl:
            paths["trl"] = lambda: run_trl(location, tokenizer, texts, examples, args.seq_len, tmp)
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for rep in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits all paths
            for name, run in paths.items():
                started = time.time()
                res = run()
                runs[name].append(res)
                print(f"[{rep + 1}/{args.repeats}] {name:13s} {res['tokens']:6d} tokens in {res['seconds']:7.1f} s = "
                      f"{res['tokens_per_s']:6.1f} tokens/s  ({res['steps']} steps; {time.time() - started:.0f} s "
                      f"with model load; load average {os.getloadavg()[0]:.2f})", flush=True)
    # Best of the repeats: what each path does when the machine lets it (others' jobs only slow it down).
    results = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}
    ours, hf, packing = results["ours"], results["hf_trainer"], results["packing_only"]
    for name, res in results.items():
        print(f"best {name:13s} {res['tokens_per_s']:6.1f} tokens/s")
    assert all(r["tokens"] == sum(lengths) for rs in runs.values() for r in rs), "token counts differ"
    trl_best = results.get("trl")
    summary = {
        "ratio_vs_hf_trainer": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        "ratio_vs_trl": round(ours["tokens_per_s"] / trl_best["tokens_per_s"], 3) if trl_best else None,
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "hf_trainer_tokens_per_s": round(hf["tokens_per_s"], 1),
        "trl_tokens_per_s": round(trl_best["tokens_per_s"], 1) if trl_best else None,
        "packing_only_tokens_per_s": round(packing["tokens_per_s"], 1),
        "packing_only_ratio": round(packing["tokens_per_s"] / hf["tokens_per_s"], 3),
        "model": "SmolLM2-135M-Instruct (demo GGUF, float32)" if not args.model else args.model,
        "device": "cpu",
        "examples": len(examples),
        "tokens": ours["tokens"],
        "seq_len": args.seq_len,
        "row_fill": ours["row_fill"],
        "trl_row_fill": trl_best["row_fill"] if trl_best else None,
        "hf_batch_size": args.batch_size,
        "hf_pad_share_unshuffled": hf["pad_share_unshuffled"],
        "repeats": args.repeats,
        "median_ratio_vs_hf_trainer": round(sorted(o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(
            runs["ours"], runs["hf_trainer"]))[args.repeats // 2], 3),
        "median_ratio_vs_trl": round(sorted(o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(
            runs["ours"], runs["trl"]))[args.repeats // 2], 3) if trl_best else None,
        "trl_version": _trl_version() if trl_best else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
