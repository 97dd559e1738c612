"""Batched, schema-constrained generation on tiny random llama / qwen2 models (real tokenizer, real decoding).

A random model emits garbage, so whatever parses under the constraint parses because of it; the same
model unconstrained must not produce a single parseable answer.
"""

from __future__ import annotations

import copy
import datetime
import json

import jsonschema
import pytest

from distill_pipeline.config import TaskConfig, load_config
from distill_pipeline.stages import formatting, student_generation
from distill_pipeline.stages.task_schema import answer_schema
from distill_pipeline.stages.tasks import parse_output
from distill_pipeline_tests.train_support import demo_tokenizer_dir, tiny_models  # noqa: F401

ARCHS = ("llama", "qwen2")
CLASSIFICATION = TaskConfig(kind="classification", labels=["acquisition", "layoffs", "litigation", "none"],
                            instruction="Which event does the sentence report?")


@pytest.fixture(scope="module")
def demo_inputs() -> list[str]:
    from distill_pipeline.demo.data import generate_rows

    sentences = list(dict.fromkeys(row.sentence for row in generate_rows(40, seed=3)))
    return sentences[:5]


@pytest.fixture(scope="module")
def loaded(tiny_models):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {arch: (AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
            for arch, path in tiny_models.items()}


def _valid(task: TaskConfig, text: str) -> bool:
    """parse_output accepts it and it validates against answer_schema (dates checked as dates)."""
    if not parse_output(task, text).ok:
        return False
    instance = text if task.kind == "classification" else json.loads(text)  # the bare label is the string
    try:
        jsonschema.validate(instance, answer_schema(task), format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError:
        return False
    return True


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["extraction", "classification"])
def test_constrained_answers_always_parse_and_unconstrained_ones_do_not(loaded, demo_inputs, arch, kind):
    model, tokenizer = loaded[arch]
    task = load_config(env={}).task if kind == "extraction" else CLASSIFICATION
    # Bounded strings: a random model never closes a free string by itself.
    constraint = student_generation.task_constraint(task, tokenizer, max_string_chars=6)
    common = dict(instruction=task.instruction, max_new_tokens=100, batch_size=3)

    constrained = student_generation.generate_answers(model, tokenizer, demo_inputs, constraint=constraint, **common)
    free = student_generation.generate_answers(model, tokenizer, demo_inputs, **common)

    assert [a.text for a in constrained if not _valid(task, a.text)] == []
    assert all(a.finished and a.error is None for a in constrained)
    assert [a.text for a in free if _valid(task, a.text)] == []
    if kind == "extraction":  # both branches of the anyOf, or the test shows only {"skip": true}
        assert any(json.loads(a.text).get("skip") is not True for a in constrained)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_answers_equal_single_ones(loaded, demo_inputs, arch):
    model, tokenizer = loaded[arch]
    task = load_config(env={}).task
    constraint = student_generation.task_constraint(task, tokenizer, max_string_chars=6)
    expected_prompts = [len(formatting.encode_prompt(tokenizer, text, None)) for text in demo_inputs]
    assert len(set(expected_prompts)) > 1  # prompts of different lengths: batches are padded

    for c, max_new in ((None, 24), (constraint, 100)):
        single = student_generation.generate_answers(model, tokenizer, demo_inputs, instruction=None,
                                                     max_new_tokens=max_new, batch_size=1, constraint=c)
        batched = student_generation.generate_answers(model, tokenizer, demo_inputs, instruction=None,
                                                      max_new_tokens=max_new, batch_size=4, constraint=c)
        assert [a.text for a in batched] == [a.text for a in single]
        assert [a.output_tokens for a in batched] == [a.output_tokens for a in single]
        assert [a.prompt_tokens for a in batched] == [a.prompt_tokens for a in single] == expected_prompts
        assert all(a.seconds > 0 for a in batched)


def test_eos_stops_each_sequence_of_a_batch(loaded, demo_inputs):
    model, tokenizer = loaded["llama"]
    reference = student_generation.generate_answers(model, tokenizer, demo_inputs, instruction=None,
                                                    max_new_tokens=12, batch_size=1)
    assert not any(a.finished for a in reference)  # the real EOS never comes from this model
    first = tokenizer(reference[0].text, add_special_tokens=False)["input_ids"]
    # Make the 3rd token the first input produces (one it has not produced before) the EOS: that answer
    # must end there while the rest of the batch runs on.
    stop_at = next(i for i in range(2, len(first)) if first[i] not in first[:i])
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(first[stop_at])
    assert stopping.eos_token_id == first[stop_at]

    answers = student_generation.generate_answers(model, stopping, demo_inputs, instruction=None,
                                                  max_new_tokens=12, batch_size=len(demo_inputs))

    assert answers[0].finished and answers[0].output_tokens == stop_at + 1
    assert answers[0].text == tokenizer.decode(first[:stop_at])
    for ref, got in zip(reference[1:], answers[1:]):
        if first[stop_at] not in tokenizer(ref.text, add_special_tokens=False)["input_ids"]:
            assert (got.text, got.output_tokens, got.finished) == (ref.text, 12, False)


def test_classification_answers_are_one_label_then_eos(loaded, demo_inputs):
    model, tokenizer = loaded["qwen2"]
    # Padding distinct from EOS (as Qwen tokenizers have it): finished rows are fed pad tokens, which
    # their matchers must not take as part of the answer.
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    answers = student_generation.generate_answers(
        model, tokenizer, demo_inputs, instruction=CLASSIFICATION.instruction, max_new_tokens=30, batch_size=5,
        constraint=student_generation.task_constraint(CLASSIFICATION, tokenizer))
    for a in answers:
        assert a.text in CLASSIFICATION.labels and a.finished and a.error is None
        assert 2 <= a.output_tokens <= len(a.text) + 1  # some tokenization of the label, then the EOS, then nothing


def test_constraint_per_task_kind(loaded):
    _, tokenizer = loaded["llama"]
    extraction = student_generation.task_constraint(load_config(env={}).task, tokenizer)
    assert extraction.kind == "json_schema" and extraction.schema["anyOf"][0]["required"] == ["skip"]
    assert student_generation.task_constraint(CLASSIFICATION, tokenizer).labels == tuple(CLASSIFICATION.labels)
    assert student_generation.task_constraint(TaskConfig(kind="generation"), tokenizer) is None
    regression = TaskConfig(kind="regression", fields={"score": {"type": "integer", "minimum": 0, "maximum": 10}})
    constraint = student_generation.task_constraint(regression, tokenizer)
    assert _accepts(constraint, tokenizer, '{"score": 7}')
    assert not _accepts(constraint, tokenizer, '{"score": 11}')
    assert not _accepts(constraint, tokenizer, '{"score":7}')  # the layout of the training targets only


def _accepts(constraint, tokenizer, text: str) -> bool:
    matcher = constraint.matcher()
    consumed = matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    return bool(consumed) and not matcher.is_error() and matcher.is_accepting()


def test_dates_are_constrained_to_what_parse_output_accepts(loaded):
    _, tokenizer = loaded["llama"]
    schema = {"type": "object", "properties": {"d": {"type": ["string", "null"], "format": "date"}},
              "required": ["d"], "additionalProperties": False}
    constraint = student_generation.json_constraint(schema, tokenizer)
    wrong = []
    for year in (1900, 2000, 2023, 2024):  # not leap, leap by 400, not leap, leap
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    datetime.date.fromisoformat(text)
                    valid = True
                except ValueError:
                    valid = False
                if _accepts(constraint, tokenizer, json.dumps({"d": text})) != valid:
                    wrong.append(text)
    assert wrong == []
    assert _accepts(constraint, tokenizer, '{"d": null}')


def test_latency_summary_of_single_requests(loaded, demo_inputs):
    model, tokenizer = loaded["llama"]
    answers = student_generation.generate_answers(model, tokenizer, demo_inputs[:3], instruction=None,
                                                  max_new_tokens=4, batch_size=1)
    summary = student_generation.latency_summary(answers)
    seconds = sorted(a.seconds for a in answers)
    assert summary["requests"] == 3 and summary["p50_s"] == pytest.approx(seconds[1])
    assert seconds[0] <= summary["p95_s"] <= seconds[2]
    assert summary["output_tokens_per_s"] == pytest.approx(12 / sum(seconds))
