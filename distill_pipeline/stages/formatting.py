"""What the student sees and learns: chat formatting, completion-only labels, padding-free packing.

- The user turn is the raw input (optionally preceded by a short task instruction); the
  assistant turn is the teacher's canonical answer. Both go through the base model's own
  chat template, so the student is prompted at inference exactly as it was trained.
- Labels are -100 on every prompt token: the loss is on the answer (and its end-of-turn
  token) only.
- Packing puts several examples in one row with position ids restarting at 0 for each and
  no attention mask; transformers then builds a block-diagonal causal mask, so examples in
  a row never attend to each other. The first label of each example is -100, so no example
  is trained to predict its neighbour's first token.

torch and transformers are imported inside functions: stages are imported by Dagster code.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("id", "input", "target")


@dataclass(frozen=True)
class Example:
    row_id: str
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_len(self) -> int:
        return next((i for i, lab in enumerate(self.labels) if lab != IGNORE_INDEX), len(self.labels))


@dataclass(frozen=True)
class Skipped:
    row_id: str
    reason: str


def user_message(input_text: str, instruction: str | None) -> str:
    instruction = (instruction or "").strip()
    return f"{instruction}\n\n{input_text}" if instruction else input_text


def prompt_text(tokenizer: Any, input_text: str, instruction: str | None = None) -> str:
    """The chat-formatted prompt, ending where the student's answer starts."""
    messages = [{"role": "user", "content": user_message(input_text, instruction)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer: Any, input_text: str, instruction: str | None = None) -> list[int]:
    """Token ids of the prompt for generation; identical to the prompt part of a training example."""
    return tokenizer(prompt_text(tokenizer, input_text, instruction), add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: Any, input_text: str, target: str, instruction: str | None = None,
                   row_id: str = "") -> Example:
    """Prompt + answer token ids, with labels only on the answer and its end-of-turn token.

    The prompt and the answer are tokenized separately, so the prompt ids are exactly those
    `encode_prompt` gives at inference (no token merges across the boundary).
    """
    prompt = prompt_text(tokenizer, input_text, instruction)
    messages = [{"role": "user", "content": user_message(input_text, instruction)},
                {"role": "assistant", "content": target}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the user turn differently once an answer follows it, so the "
            "prompt cannot be separated from the answer; set train.base_model.chat_template"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: the student could never learn to stop")
    if eos in answer_ids:
        # Learn the end-of-turn token, not what the template puts after it (usually "\n").
        last = len(answer_ids) - 1 - answer_ids[::-1].index(eos)
        answer_ids = answer_ids[: last + 1]
    else:
        answer_ids = answer_ids + [eos]
    return Example(row_id, prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def read_split(path: Path) -> Any:
    """A split file as a pyarrow Table, with a clear error when it cannot be used."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist: materialize dataset_splits first")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"split file {path} lacks column(s) {missing} (has {table.column_names}); "
                         f"training needs {list(REQUIRED_COLUMNS)}")
    return table


def encode_rows(tokenizer: Any, table: Any, instruction: str | None, max_seq_len: int
                ) -> tuple[list[Example], list[Skipped]]:
    """Examples for every usable row; unusable rows are skipped with a reason, never silently."""
    examples: list[Example] = []
    skipped: list[Skipped] = []
    ids = table.column("id").to_pylist()
    inputs = table.column("input").to_pylist()
    targets = table.column("target").to_pylist()
    for row_id, text, target in zip(ids, inputs, targets):
        rid = str(row_id)
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(Skipped(rid, "input is binary and not UTF-8"))
                continue
        if text is None or not str(text).strip():
            skipped.append(Skipped(rid, "input is null or empty"))
            continue
        if target is None or not str(target).strip():
            skipped.append(Skipped(rid, "target is null or empty"))
            continue
        example = encode_example(tokenizer, str(text), str(target), instruction, rid)
        if len(example) > max_seq_len:
            skipped.append(Skipped(rid, f"{len(example)} tokens > train.max_seq_len={max_seq_len}"))
            continue
        examples.append(example)
    return examples, skipped


def _row_hash(ex: Example) -> bytes:
    return hashlib.blake2b(ex.row_id.encode(), digest_size=8).digest()


def stable_subset(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """At most `limit` examples, chosen by a hash of the row id: the same rows as the split grows."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    return sorted(examples, key=_row_hash)[:limit]


def spread_by_label(examples: Sequence[Example], label_of: dict[str, str], n: int) -> list[Example]:
    """`n` examples taking each label in turn (in row-hash order), so a few samples show several kinds."""
    buckets: dict[str, list[Example]] = {}
    for ex in sorted(examples, key=_row_hash):
        buckets.setdefault(label_of.get(ex.row_id, ""), []).append(ex)
    picked: list[Example] = []
    while len(picked) < n and any(buckets.values()):
        for bucket in buckets.values():
            if bucket and len(picked) < n:
                picked.append(bucket.pop(0))
    return picked


def pack(examples: Sequence[Example], capacity: int, seed: int | None = 0) -> list[list[Example]]:
    """Best-fit bins of at most `capacity` tokens, deterministic for a given seed.

    Examples are taken in a seeded random order (seed None: longest first, the tightest fill)
    so that each row mixes short and long examples: length-sorted bins would make rows of
    one kind only (e.g. all short "skip" answers) and batches far from i.i.d. Each example
    goes to the fullest bin that still has room; a sorted list of (free tokens, bin index)
    keeps that lookup logarithmic.
    """
    if seed is None:
        order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    else:
        order = random.Random(seed).sample(range(len(examples)), len(examples))
    bins: list[list[Example]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        size = len(examples[i])
        if size > capacity:
            raise ValueError(f"example {examples[i].row_id} has {size} tokens, more than the row size {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(examples[i])
            bisect.insort(free, (room - size, b))
        else:
            bins.append([examples[i]])
            bisect.insort(free, (capacity - size, len(bins) - 1))
    return bins


class PackedCollator:
    """A batch of bins -> rows of concatenated examples with per-example position ids.

    Rows of one batch are padded to the same length with a pad *segment* (its own positions
    starting at 0 and labels -100), which the block-diagonal mask keeps apart from the
    examples. `real_tokens` (a plain int) counts the non-pad tokens for throughput figures.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, bins: Sequence[Sequence[Example]]) -> dict[str, Any]:
        import torch

        rows_ids, rows_labels, rows_pos = [], [], []
        for examples in bins:
            ids: list[int] = []
            labels: list[int] = []
            pos: list[int] = []
            for ex in examples:
                ids += ex.input_ids
                labels += [IGNORE_INDEX] + ex.labels[1:]
                pos += range(len(ex))
            rows_ids.append(ids)
            rows_labels.append(labels)
            rows_pos.append(pos)
        width = max(len(r) for r in rows_ids)
        real = sum(len(r) for r in rows_ids)
        for ids, labels, pos in zip(rows_ids, rows_labels, rows_pos):
            pad = width - len(ids)
            ids += [self.pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            pos += range(pad)
        return {
            "input_ids": torch.tensor(rows_ids, dtype=torch.long),
            "labels": torch.tensor(rows_labels, dtype=torch.long),
            "position_ids": torch.tensor(rows_pos, dtype=torch.long),
            "real_tokens": real,
        }


class PaddedCollator:
    """A batch of examples -> right-padded rows with an attention mask (packing off)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        import torch

        width = max(len(ex) for ex in examples)
        ids = [ex.input_ids + [self.pad_token_id] * (width - len(ex)) for ex in examples]
        labels = [ex.labels + [IGNORE_INDEX] * (width - len(ex)) for ex in examples]
        mask = [[1] * len(ex) + [0] * (width - len(ex)) for ex in examples]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "real_tokens": sum(len(ex) for ex in examples),
        }
