"""LoRA training of the student on one prompt version's splits.

`train_student` runs in the training worker process (distill_pipeline/workers/train.py),
alone or as one rank of `accelerate launch`; every rank calls it, rank 0 writes files and
reports. It uses the transformers `Trainer` for the loop (gradient accumulation, DDP,
checkpoints with optimizer/scheduler/RNG state, best checkpoint, early stopping) and adds:
padding-free packing, an exact token-weighted validation loss, throughput in real tokens,
resume only from a checkpoint of the same settings and data, and a checked PEFT adapter.

Output directory layout:
  checkpoints/checkpoint-<step>/   Trainer checkpoints (the best and the latest are kept)
  adapter/                         the best adapter (canonical PEFT; checked for LoRA servers)
  run_state.json                   fingerprint of settings + data, initial val loss, completed
  train_result.json                the TrainResult of the last completed run
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill_pipeline import distributed
from distill_pipeline.clients.tracking import NullTracker, Tracker, file_sha256
from distill_pipeline.config import PipelineConfig
from distill_pipeline.stages import formatting, student_model
from distill_pipeline.stages.student_trainer import make_trainer_class, progress_callback, supports_logits_to_keep

Report = Callable[[str, dict], None]
CHECKPOINTS = "checkpoints"
ADAPTER = student_model.ADAPTER_DIR
RUN_STATE = "run_state.json"
RESULT = "train_result.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    adapter_dir: Path
    best_checkpoint: Path | None
    initial_val_loss: float
    best_val_loss: float | None
    final_val_loss: float | None
    final_train_loss: float | None
    steps: int  # optimizer steps done in total (global step, resumed runs included)
    max_steps: int  # planned optimizer steps
    epochs: float  # epochs done (fractional)
    stopped_early: bool
    resumed_from_step: int | None  # the checkpoint this run resumed from, None for a fresh start
    train_examples: int
    val_examples: int  # validation rows the loss is computed on (after train.eval_max_rows)
    skipped: dict[str, int]  # reason -> rows not used (train and val)
    train_tokens: int  # real (non-pad) tokens trained on in this run, all ranks
    tokens_per_s: float  # train_tokens / seconds of the training loop (its evaluations and checkpoints included)
    seconds: float  # wall time of train_student
    world_size: int
    base_model: str  # the plain model directory or hub id the adapter applies to
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)  # {id, input, target, output}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        data["best_checkpoint"] = str(self.best_checkpoint) if self.best_checkpoint else None
        return data


def checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else -1


def is_complete_checkpoint(path: Path) -> bool:
    # The Trainer writes trainer_state.json last, after weights, optimizer, scheduler and RNG state.
    return (path / "trainer_state.json").is_file() and (path / student_model.ADAPTER_WEIGHTS).is_file()


def last_checkpoint(output_dir: Path) -> Path | None:
    """The latest complete checkpoint under output_dir/checkpoints (a crash can leave a partial one)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if checkpoint_step(p) >= 0 and is_complete_checkpoint(p)]
    return max(done, key=checkpoint_step) if done else None


def fingerprint(cfg: PipelineConfig, instruction: str | None, splits_dir: Path, base: str, world: int) -> str:
    # Reporting settings may change between a crash and a resume.
    settings = cfg.train.model_dump(mode="json", exclude=set(cfg.train.NOT_AFFECTING_ADAPTER))
    data = {name: file_sha256(splits_dir / f"{name}.parquet") for name in ("train", "val")}
    blob = json.dumps({"train": settings, "instruction": instruction, "data": data, "base": base,
                       "world_size": world}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_output(output_dir: Path, fp: str, resume: bool) -> list[str]:
    """Rank 0: keep checkpoints only when they belong to an unfinished run of the same fingerprint."""
    notes = []
    output_dir.mkdir(parents=True, exist_ok=True)
    state_path = output_dir / RUN_STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    ckpts = output_dir / CHECKPOINTS
    same = state.get("fingerprint") == fp and not state.get("completed")
    if ckpts.exists() and not (resume and same):
        why = "resume is off" if not resume else "the last run finished" if state.get("completed") \
            else "settings or data changed"
        notes.append(f"starting fresh ({why}): removing old checkpoints")
        shutil.rmtree(ckpts)
        state = {}
    if ckpts.is_dir():
        for path in ckpts.iterdir():
            if checkpoint_step(path) >= 0 and not is_complete_checkpoint(path):
                notes.append(f"removing incomplete checkpoint {path.name} (interrupted while saving)")
                shutil.rmtree(path)
    state.update({"fingerprint": fp, "completed": False})
    state_path.write_text(json.dumps(state, indent=2))
    return notes


def _val_loss_of(output_dir: Path) -> float | None:
    path = output_dir / RUN_STATE
    return json.loads(path.read_text()).get("initial_val_loss") if path.is_file() else None


def _update_state(output_dir: Path, **values: Any) -> None:
    path = output_dir / RUN_STATE
    state = json.loads(path.read_text()) if path.is_file() else {}
    state.update(values)
    path.write_text(json.dumps(state, indent=2))


def _encode_splits(tokenizer: Any, train_table: Any, val_table: Any, instruction: str | None, max_seq_len: int,
                   splits_dir: Path, say: Report) -> tuple[list, list, dict[str, int]]:
    """Train and val examples, and the count of skipped rows per reason (the first few named)."""
    train_ex, skipped = formatting.encode_rows(tokenizer, train_table, instruction, max_seq_len)
    val_all, val_skipped = formatting.encode_rows(tokenizer, val_table, instruction, max_seq_len)
    skipped_counts: dict[str, int] = {}
    for item in skipped + val_skipped:
        reason = re.sub(r"^\d+ tokens", "too many tokens", item.reason)
        skipped_counts[reason] = skipped_counts.get(reason, 0) + 1
    if skipped or val_skipped:
        first = ", ".join(f"{s.row_id} ({s.reason})" for s in (skipped + val_skipped)[:5])
        say("warning", {"message": f"{len(skipped)} train and {len(val_skipped)} val rows skipped: {first}"})
    if not train_ex:
        raise ValueError(f"no usable training rows in {splits_dir / 'train.parquet'} ({skipped_counts or 'empty'})")
    if not val_all:
        raise ValueError(f"no usable validation rows in {splits_dir / 'val.parquet'} ({skipped_counts or 'empty'})")
    return train_ex, val_all, skipped_counts


def training_arguments(tc: Any, checkpoints_dir: Path, dtype: Any, use_cpu: bool, world: int) -> Any:
    """transformers TrainingArguments for train.* (best checkpoint by val loss, resumable checkpoints)."""
    import torch
    from transformers import TrainingArguments

    by_steps = tc.eval_steps is not None
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=tc.micro_batch_size,
        per_device_eval_batch_size=tc.micro_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        eval_strategy="steps" if by_steps else "epoch",
        eval_steps=tc.eval_steps,
        save_strategy="steps" if by_steps else "epoch",
        save_steps=tc.save_steps or tc.eval_steps or 500,
        save_total_limit=tc.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=tc.logging_steps,
        logging_first_step=True,
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        gradient_checkpointing=tc.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if tc.gradient_checkpointing else None,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and world > 1 else None,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
    )


def train_student(cfg: PipelineConfig, splits_dir: Path, output_dir: Path, tracker: Tracker = NullTracker(),
                  report: Report | None = None) -> TrainResult:
    """Train the LoRA adapter on splits_dir/{train,val}.parquet; the adapter goes to output_dir/adapter."""
    return fit(cfg, splits_dir, output_dir, tracker, report)[0]


def fit(cfg: PipelineConfig, splits_dir: Path, output_dir: Path, tracker: Tracker = NullTracker(),
        report: Report | None = None) -> tuple[TrainResult, Any]:
    """`train_student`, also returning the trained PEFT model (in memory, best adapter loaded)."""
    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    started = time.time()
    tc = cfg.train
    splits_dir, output_dir = Path(splits_dir).resolve(), Path(output_dir).resolve()
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    say: Report = (report or (lambda kind, data: None)) if main else (lambda kind, data: None)
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    # Start the process group now (a no-op for one process) so ranks can wait for rank 0 below.
    dist_state = PartialState(cpu=use_cpu, backend="gloo" if use_cpu and world > 1 else None)

    train_table = formatting.read_split(splits_dir / "train.parquet")
    val_table = formatting.read_split(splits_dir / "val.parquet")
    with dist_state.main_process_first():  # rank 0 converts a GGUF base once; the others reuse it
        location = student_model.prepare_base(tc.base_model, tc.base_model.cache_root())
    tokenizer = student_model.load_tokenizer(location, tc.base_model.chat_template, tc.base_model.revision)
    instruction = tc.instruction if tc.instruction is not None else cfg.task.instruction

    train_ex, val_all, skipped_counts = _encode_splits(tokenizer, train_table, val_table, instruction,
                                                       tc.max_seq_len, splits_dir, say)
    val_ex = formatting.stable_subset(val_all, tc.eval_max_rows)

    fp = fingerprint(cfg, instruction, splits_dir, location, world)
    if main:
        for note in _prepare_output(output_dir, fp, tc.resume):
            say("info", {"message": note})
    dist_state.wait_for_everyone()
    resume_from = last_checkpoint(output_dir) if tc.resume else None

    dtype = student_model.resolve_dtype(tc.dtype)
    set_seed(tc.seed)
    base = student_model.load_model(location, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
                                    tc.attn_implementation, tc.base_model.revision)
    base.config.use_cache = False  # a cache during training would also disable packed-sequence masking
    alpha = int(tc.lora.alpha) if float(tc.lora.alpha).is_integer() else tc.lora.alpha
    lora = LoraConfig(r=tc.lora.r, lora_alpha=alpha, lora_dropout=tc.lora.dropout,
                      target_modules=student_model.lora_target_modules(base, tc.lora.target_modules),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)

    pad_id = tokenizer.pad_token_id
    if tc.packing:
        train_items = formatting.pack(train_ex, tc.max_seq_len, seed=tc.seed)
        eval_items = formatting.pack(val_ex, tc.max_seq_len, seed=None)  # order is irrelevant to a mean
        collate: Any = formatting.PackedCollator(pad_id)
    else:
        train_items, eval_items = train_ex, val_ex
        collate = formatting.PaddedCollator(pad_id)
    train_tokens_epoch = sum(len(ex) for ex in train_ex)
    say("data", {"train_examples": len(train_ex), "val_examples": len(val_ex), "train_rows": len(train_items),
                 "tokens_per_epoch": train_tokens_epoch, "skipped": skipped_counts,
                 "row_fill": round(train_tokens_epoch / (len(train_items) * tc.max_seq_len), 3)
                 if tc.packing else None})

    args = training_arguments(tc, output_dir / CHECKPOINTS, dtype, use_cpu, world)
    callbacks = [progress_callback(tracker, say)]
    if tc.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(tc.early_stopping_patience, tc.early_stopping_threshold))
    trainer = make_trainer_class()(
        model=model, args=args, train_dataset=_ListDataset(train_items), eval_dataset=_ListDataset(eval_items),
        data_collator=collate, processing_class=tokenizer, callbacks=callbacks,
        eval_items=eval_items, collate=collate, selective=supports_logits_to_keep(base),
    )
    trainer.remove_callback(PrinterCallback)  # our Progress callback reports instead of raw dict prints

    initial = _val_loss_of(output_dir) if resume_from else None
    if initial is None:
        initial, _ = trainer.val_loss()
        if main:
            _update_state(output_dir, initial_val_loss=initial)
    if main:
        tracker.log_metrics({"eval_loss": initial}, step=0)
    say("start", {"initial_val_loss": initial, "resume_from_step": checkpoint_step(resume_from)
                  if resume_from else None, "world_size": world})

    t_train = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - t_train
    tokens = torch.tensor([trainer.tokens_seen], dtype=torch.int64, device=args.device)
    if world > 1:
        tokens = trainer.accelerator.reduce(tokens, reduction="sum")
    session_tokens = int(tokens.item())

    state = trainer.state
    history = state.log_history
    train_losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    adapter_dir = output_dir / ADAPTER
    if main:
        student_model.save_adapter(trainer.model, adapter_dir)
    dist_state.wait_for_everyone()

    result = TrainResult(
        adapter_dir=adapter_dir,
        best_checkpoint=Path(state.best_model_checkpoint) if state.best_model_checkpoint else None,
        initial_val_loss=initial,
        best_val_loss=state.best_metric,
        final_val_loss=val_losses[-1][1] if val_losses else None,
        final_train_loss=train_losses[-1][1] if train_losses else None,
        steps=state.global_step,
        max_steps=state.max_steps,
        epochs=round(state.epoch or 0.0, 4),
        stopped_early=state.global_step < state.max_steps,
        resumed_from_step=checkpoint_step(resume_from) if resume_from else None,
        train_examples=len(train_ex),
        val_examples=len(val_ex),
        skipped=skipped_counts,
        train_tokens=session_tokens,
        tokens_per_s=session_tokens / train_seconds if train_seconds > 0 else 0.0,
        seconds=0.0,
        world_size=world,
        base_model=location,
        train_losses=train_losses,
        val_losses=val_losses,
    )
    if main and tc.sample_count:
        result.samples = _samples(trainer.model, tokenizer, val_table, val_ex, instruction, tc.sample_count,
                                  tc.sample_max_new_tokens)
    result.seconds = round(time.time() - started, 2)
    if main:
        (output_dir / RESULT).write_text(json.dumps(result.to_json(), indent=2, default=str))
        _update_state(output_dir, completed=True)
        tracker.log_metrics({"best_val_loss": result.best_val_loss or initial, "tokens_per_s": result.tokens_per_s},
                            step=result.steps)
        say("done", {"steps": result.steps, "best_val_loss": result.best_val_loss,
                     "tokens_per_s": round(result.tokens_per_s, 1), "train_runtime": output.metrics.get(
                         "train_runtime")})
    return result, trainer.model


def _samples(model: Any, tokenizer: Any, table: Any, examples: list, instruction: str | None, n: int,
             max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers on `n` validation rows (spread over labels), next to the teacher's."""
    columns = [c for c in ("id", "input", "target", "label") if c in table.column_names]
    rows = {str(r["id"]): r for r in table.select(columns).to_pylist()}
    picks = formatting.spread_by_label(examples, {k: str(r.get("label", "")) for k, r in rows.items()}, n)
    texts = [rows[ex.row_id]["input"] for ex in picks]
    texts = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else str(t) for t in texts]
    outputs = generate(model, tokenizer, texts, instruction, max_new_tokens)
    return [{"id": ex.row_id, "input": text, "target": rows[ex.row_id]["target"], "output": out}
            for ex, text, out in zip(picks, texts, outputs)]


class _ListDataset:
    """A list as a map-style dataset (the Trainer needs __len__ and __getitem__)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def generate(model: Any, tokenizer: Any, inputs: list[str], instruction: str | None, max_new_tokens: int) -> list[str]:
    """Greedy answers of the student, prompted exactly as in training (one input at a time)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    with torch.no_grad():
        for text in inputs:
            ids = torch.tensor([formatting.encode_prompt(tokenizer, text, instruction)], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
