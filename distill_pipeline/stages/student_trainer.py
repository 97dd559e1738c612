"""The training loop's additions to the transformers Trainer (used by stages/student_training.py).

- answer-only logits: only positions that predict an answer token are projected onto the
  vocabulary (`logits_to_keep` as a boolean mask), skipping most of the output-head work;
- an exact validation loss: the mean over every answer token, summed across ranks (the stock
  evaluation averages per-batch means, which weighs short and long batches alike);
- real-token counting for throughput (padding never counts);
- progress to the tracker and the caller from rank 0 only.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from distill_pipeline.clients.tracking import Tracker
from distill_pipeline.stages import formatting

Report = Callable[[str, dict], None]


def supports_logits_to_keep(model: Any) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def answer_loss(model: Any, batch: dict[str, Any], selective: bool) -> tuple[Any, Any]:
    """(sum of token losses, number of answer tokens) of one batch.

    selective: project only the positions that predict an answer token onto the vocabulary
    (`logits_to_keep` as a boolean mask). Prompt positions make up most of every row and
    their logits are never used, so this skips most of the output-head work in both passes.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets_mask = labels[:, 1:] != formatting.IGNORE_INDEX
    count = targets_mask.sum()
    if not selective:
        loss = model(**inputs, labels=labels, use_cache=False).loss  # mean over answer tokens
        return loss.float() * count, count
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, labels[:, 1:][targets_mask], reduction="sum"), count


def make_trainer_class() -> type:
    import torch
    from transformers import Trainer

    class StudentTrainer(Trainer):
        """Trainer + real-token counting + answer-only logits + exact token-weighted validation loss."""

        def __init__(self, *args: Any, eval_items: list, collate: Callable, selective: bool, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.eval_items = eval_items
            self.collate = collate
            self.selective = selective
            self.tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            real = inputs.pop("real_tokens", None)
            if real is not None and model.training:
                self.tokens_seen += int(real)
            if not self.selective or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            total, count = answer_loss(model, inputs, selective=True)
            if num_items_in_batch is None:
                return total / count.clamp(min=1)
            # Normalized over the whole accumulated (and, across ranks, gathered) batch, as the
            # Trainer does for models taking num_items_in_batch; DDP then averages over ranks.
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
            return loss

        def val_loss(self) -> tuple[float, int]:
            """Mean loss over every answer token of the validation rows (all ranks together)."""
            model = self.model
            was_training = model.training
            model.eval()
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            mine = self.eval_items[self.args.process_index::self.args.world_size]
            size = self.args.per_device_eval_batch_size
            with torch.no_grad():
                for start in range(0, len(mine), size):
                    batch = self.collate(mine[start:start + size])
                    batch.pop("real_tokens")
                    batch = self._prepare_inputs(batch)
                    with self.compute_loss_context_manager():
                        loss_sum, count = answer_loss(model, batch, self.selective)
                    total += torch.stack([loss_sum.double(), count.double()])
            if self.args.world_size > 1:
                total = self.accelerator.reduce(total, reduction="sum")
            model.train(was_training)
            return (total[0] / total[1]).item(), int(total[1].item())

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):  # noqa: ANN001
            start = time.time()
            loss, tokens = self.val_loss()
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": tokens,
                       f"{metric_key_prefix}_runtime": round(time.time() - start, 3)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return StudentTrainer


def progress_callback(tracker: Tracker, report: Report) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Per-step metrics to the tracker and progress lines to the caller, from rank 0 only."""

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not state.is_world_process_zero or not logs:
                return
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
            tracker.log_metrics(metrics, step=state.global_step)
            report("progress", {"step": state.global_step, "max_steps": state.max_steps,
                                "epoch": round(state.epoch or 0.0, 3), **metrics})

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero:
                report("checkpoint", {"step": state.global_step})

    return Progress()
