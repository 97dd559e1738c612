"""The student's answers for evaluation: batched greedy decoding, optionally held to the task's schema.

- Prompts are built exactly as in training (`formatting.encode_prompt`), left-padded into batches
  (inputs sorted by prompt length so a batch wastes little on padding; results come back in input
  order), decoded greedily with the KV cache; each sequence stops at the tokenizer's EOS, the token
  the student was trained to end its answer with.
- A constraint masks, at every step, the tokens that would leave the task's grammar: the answer's
  JSON Schema (`task_schema.answer_schema`) for extraction/regression, in the exact layout of the
  training targets (`tasks.canonical_json`: ", " and ": " separators, fields in schema order); one
  of the labels as bare text for classification. Masks come from llguidance, one matcher per
  sequence (so batching works), computed in parallel for a batch: about 0.1-1.5 ms a step on 2 CPU
  cores with the demo schema, about 1% of a decoding step of the 135M demo student.
- Greedy means plain argmax: repetition penalties a base model's generation_config may carry are
  switched off, so the scores are those of the student's own distribution.

torch, transformers and llguidance are imported inside functions: stages are imported by Dagster code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from distill_pipeline.config import TaskConfig
from distill_pipeline.stages import formatting
from distill_pipeline.stages.task_schema import answer_schema

# YYYY-MM-DD that `datetime.date.fromisoformat` (what tasks.parse_output checks) accepts: month
# lengths, and February 29th only in leap years. llguidance's own "format": "date" allows 02-29 in
# every year, which would let a constrained answer fail parsing.
_YEAR = r"\d{4}"
_LEAP_YEAR = r"(?:\d{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
DATE_PATTERN = (
    rf"^(?:{_YEAR}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1\d|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
    rf"|{_LEAP_YEAR}-02-29)$"
)
# The layout of tasks.canonical_json; no free whitespace, which a weak model can emit forever.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Generated:
    """One answer. `seconds` is the wall time of its batch (padding, generate, detokenizing; prompts are
    tokenized up front, well under a millisecond each) divided evenly among the batch's members, so
    with batch_size=1 it is that request's latency."""

    text: str  # the generated text without the final EOS
    prompt_tokens: int
    output_tokens: int  # generated tokens, counting the EOS that ended the answer
    seconds: float
    finished: bool  # ended with EOS; False: cut at max_new_tokens (or stopped by a constraint error)
    error: str | None = None  # the constraint's error, if it failed on this sequence


@dataclass(frozen=True)
class Constraint:
    """A grammar answers must follow, bound to one tokenizer (its vocabulary and EOS)."""

    kind: str  # "json_schema" or "choice"
    grammar: str  # llguidance grammar text, compiled once per sequence
    lltokenizer: Any  # llguidance.LLTokenizer
    eos_token_id: int
    schema: dict[str, Any] | None = None  # the JSON Schema enforced (kind json_schema)
    labels: tuple[str, ...] = ()  # the choices (kind choice)
    # A fresh matcher to copy: copying is ~300x cheaper than compiling the grammar for each sequence.
    template: Any = field(default=None, repr=False, compare=False)

    def matcher(self) -> Any:
        """A matcher at the start of an answer."""
        if self.template is not None:
            return self.template.deep_copy()
        import llguidance

        return llguidance.LLMatcher(self.lltokenizer, self.grammar, log_level=0)


def _lltokenizer(tokenizer: Any) -> Any:
    import llguidance.hf

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: a constrained answer could never end")
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=tokenizer.eos_token_id)


def _checked(kind: str, grammar: str, tokenizer: Any, **extra: Any) -> Constraint:
    import llguidance

    lltok = _lltokenizer(tokenizer)
    error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
    if error:
        raise ValueError(f"the {kind} constraint does not compile: {error}")
    template = llguidance.LLMatcher(lltok, grammar, log_level=0)
    return Constraint(kind, grammar, lltok, tokenizer.eos_token_id, template=template, **extra)


def _bounded(schema: Any, max_string_chars: int | None) -> Any:
    """The schema as enforced: dates by DATE_PATTERN, free strings at most max_string_chars long."""
    if isinstance(schema, list):
        return [_bounded(item, max_string_chars) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("anyOf", "oneOf", "allOf", "items"):
        if key in out:
            out[key] = _bounded(out[key], max_string_chars)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: _bounded(sub, max_string_chars) for name, sub in out["properties"].items()}
    types = out.get("type")
    if not (types == "string" or isinstance(types, list) and "string" in types):
        return out
    if out.get("format") == "date":
        del out["format"]
        out["pattern"] = DATE_PATTERN
    elif max_string_chars is not None and not any(k in out for k in ("enum", "const", "pattern", "format")):
        out["maxLength"] = min(out.get("maxLength", max_string_chars), max_string_chars)
    return out


def json_constraint(schema: dict[str, Any], tokenizer: Any, *, max_string_chars: int | None = None) -> Constraint:
    """Answers that are JSON documents valid under `schema`, laid out like the training targets.

    max_string_chars bounds every free-text string: an undertrained student can stay inside a
    string until max_new_tokens runs out, leaving unparseable JSON; None leaves strings unbounded.
    """
    enforced = _bounded(schema, max_string_chars)
    return _checked("json_schema", json_grammar(enforced), tokenizer, schema=enforced)


# llguidance's Lark dialect; llama.cpp (built with llguidance) takes a `grammar` with this header as is.
LARK_HEADER = "%llguidance {}\n"


def json_grammar(schema: dict[str, Any]) -> str:
    """Grammar text for `schema` in the training layout (x-guidance carries the layout)."""
    return LARK_HEADER + "start: %json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT}, ensure_ascii=False)


def choice_grammar(labels: Sequence[str]) -> str:
    if not labels:
        raise ValueError("a choice constraint needs at least one label")
    # Lark string literals take JSON escapes; ensure_ascii=False keeps non-ASCII labels as they are.
    return LARK_HEADER + "start: " + " | ".join(json.dumps(str(label), ensure_ascii=False) for label in labels)


def task_grammar(task: TaskConfig, *, max_string_chars: int | None = None) -> str | None:
    """The grammar text of `task_constraint`, without a tokenizer: serving hands it to llama.cpp, so the
    deployed student is held to exactly the grammar it was evaluated under."""
    if task.kind == "generation":
        return None
    if task.kind == "classification":
        return choice_grammar(task.labels)
    return json_grammar(_bounded(answer_schema(task), max_string_chars))


def choice_constraint(labels: Sequence[str], tokenizer: Any) -> Constraint:
    """Answers that are exactly one of `labels`, as bare text (the classification target format)."""
    return _checked("choice", choice_grammar(labels), tokenizer, labels=tuple(str(label) for label in labels))


def task_constraint(task: TaskConfig, tokenizer: Any, *, max_string_chars: int | None = None) -> Constraint | None:
    """The constraint for the task kind: its JSON Schema (extraction, regression), its labels
    (classification), or None (generation: free text)."""
    if task.kind == "generation":
        return None
    if task.kind == "classification":
        return choice_constraint(task.labels, tokenizer)
    return json_constraint(answer_schema(task), tokenizer, max_string_chars=max_string_chars)


class _Masker:
    """Per-sequence grammar state for one batch, called by `generate` as a logits processor.

    Call i sees the token each sequence chose at call i-1 (the last column of input_ids); finished
    sequences are fed padding by `generate`, which their stopped matchers ignore.
    """

    def __init__(self, constraint: Constraint, batch: int):
        import numpy as np

        self.constraint = constraint
        self.matchers = [constraint.matcher() for _ in range(batch)]
        self.errors: list[str | None] = [None] * batch
        self.words = (constraint.lltokenizer.vocab_size + 31) // 32
        self.bitmask = np.zeros((batch, self.words), dtype=np.int32)
        self.started = False

    def _eos_only(self, row: int) -> None:
        import numpy as np

        eos = self.constraint.eos_token_id
        self.bitmask[row] = 0
        self.bitmask.view(np.uint32)[row, eos // 32] = 1 << (eos % 32)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np
        import torch

        if self.started:
            last = input_ids[:, -1].tolist()
            for row, matcher in enumerate(self.matchers):
                if self.errors[row] is None and not matcher.is_stopped():
                    matcher.consume_token(last[row])
        self.started = True
        live = []
        for row, matcher in enumerate(self.matchers):
            if self.errors[row] is None and matcher.is_error():
                self.errors[row] = matcher.get_error()
            if self.errors[row] is None:
                live.append((matcher, row))
            else:
                self._eos_only(row)  # end a failed sequence rather than let it emit unconstrained text
        if len(live) > 1:  # the rows' masks in parallel threads
            _executor().unsafe_compute_mask_ptr(live, self.bitmask.ctypes.data, self.words * 4, len(self.matchers))
        else:
            for matcher, row in live:
                matcher.unsafe_compute_mask_ptr(self.bitmask[row].ctypes.data, self.words * 4)
        # Bit j of word w allows token 32*w + j. Tokens past the tokenizer's vocabulary (padded
        # embedding rows) are never allowed.
        allowed = np.unpackbits(self.bitmask.view(np.uint8), axis=1, bitorder="little").view(bool)
        known = min(scores.shape[1], allowed.shape[1])
        scores[:, :known].masked_fill_(torch.from_numpy(~allowed[:, :known]).to(scores.device), float("-inf"))
        scores[:, known:] = float("-inf")
        return scores


_EXECUTOR: Any = None


def _executor() -> Any:
    """One thread pool for every batch (llguidance sizes it to the machine's CPUs)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def _greedy_config(tokenizer: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                            repetition_penalty=1.0, no_repeat_ngram_size=0)


def generate_answers(model: Any, tokenizer: Any, inputs: list[str], *, instruction: str | None, max_new_tokens: int,
                     batch_size: int, constraint: Constraint | None = None, progress: bool = False) -> list[Generated]:
    """Greedy answers of the student for `inputs`, in input order; see the module docstring."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: answers could never end")
    if constraint is not None and constraint.eos_token_id != eos:
        raise ValueError(f"the constraint ends answers with token {constraint.eos_token_id}, the tokenizer with {eos}: "
                         "build the constraint from this tokenizer")
    config = _greedy_config(tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    prompts = [formatting.encode_prompt(tokenizer, text, instruction) for text in inputs]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generated | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", unit="answer", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            members = order[start:start + batch_size]
            began = time.perf_counter()
            width = max(len(prompts[i]) for i in members)
            # Left padding: every prompt ends at the last column, where generation continues.
            ids = [[config.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in members]
            mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in members]
            masker = _Masker(constraint, len(members)) if constraint is not None else None
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([masker]) if masker is not None else None)
            rows = out[:, width:].tolist()
            decoded = []
            for k, row in enumerate(rows):
                finished = eos in row
                row = row[: row.index(eos)] if finished else row
                error = masker.errors[k] if masker is not None else None
                decoded.append((tokenizer.decode(row, skip_special_tokens=False), len(row) + finished,
                                finished and error is None, error))
            seconds = (time.perf_counter() - began) / len(members)
            for i, (text, n_out, finished, error) in zip(members, decoded):
                results[i] = Generated(text, len(prompts[i]), n_out, seconds, finished, error)
            bar.update(len(members))
    finally:
        bar.close()
        model.train(was_training)
    return [r for r in results if r is not None]


def latency_summary(answers: Sequence[Generated]) -> dict[str, float]:
    """p50/p95/mean seconds per answer and output tokens per second; meant for batch_size=1 runs,
    where each answer's seconds is its own request's latency."""
    import numpy as np

    seconds = np.array([a.seconds for a in answers], dtype=float)
    if not len(seconds):
        return {"requests": 0, "p50_s": 0.0, "p95_s": 0.0, "mean_s": 0.0, "output_tokens_per_s": 0.0}
    tokens = sum(a.output_tokens for a in answers)
    return {"requests": len(answers), "p50_s": float(np.percentile(seconds, 50)),
            "p95_s": float(np.percentile(seconds, 95)), "mean_s": float(seconds.mean()),
            "output_tokens_per_s": tokens / float(seconds.sum()) if seconds.sum() else 0.0}
