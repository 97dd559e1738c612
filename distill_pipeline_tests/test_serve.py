"""`distill serve`: a teacher client (the `openai` package) gets schema-valid answers from the student's GGUF
by changing its base URL; the teacher's prompt is reduced to the raw input the student was trained on."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from distill_pipeline.config import load_config
from distill_pipeline.serving import StudentModel, make_server, raw_input_of, template_pattern
from distill_pipeline.stages.student_generation import task_grammar
from distill_pipeline.stages.task_schema import answer_schema
from distill_pipeline_tests.train_support import demo_tokenizer_dir, tiny_models  # noqa: F401 - fixtures

SENTENCE = "On March 3, 2026, Apex Holdings Inc. completed the acquisition of Birch Energy Corp. for $75 million."


def test_the_teacher_prompt_is_reduced_to_the_raw_input():
    pattern = template_pattern("Sentence: {input}\n")
    teacher_request = [{"role": "system", "content": "You extract corporate events ... rubric ..."},
                       {"role": "user", "content": f"Sentence: {SENTENCE}"}]
    assert raw_input_of(teacher_request, pattern) == SENTENCE
    assert raw_input_of([{"role": "user", "content": SENTENCE}], pattern) == SENTENCE  # raw already
    parts = [{"role": "user", "content": [{"type": "text", "text": "Sentence: "}, {"type": "text", "text": "x y"}]}]
    assert raw_input_of(parts, pattern) == "x y"
    with pytest.raises(ValueError, match="no user message"):
        raw_input_of([{"role": "system", "content": "hi"}], pattern)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    from distill_pipeline.stages.gguf_export import write_gguf

    path = tmp_path_factory.mktemp("serve") / "tiny-llama-f16.gguf"
    write_gguf(tiny_models["llama"], path, "F16")
    return path


def test_openai_client_gets_schema_valid_json_from_the_served_student(tiny_gguf):
    from openai import OpenAI

    task = load_config().task  # the demo's extraction task: anyOf skip / event with enums and dates
    # A random model wanders inside free strings until max_tokens runs out: bound them (as eval can) so
    # every answer completes, and what is checked is the grammar, not the length limit.
    student = StudentModel(tiny_gguf, task_grammar(task, max_string_chars=12),
                           user_pattern=template_pattern("Sentence: {input}"), name="sec-student:v1", context=1024,
                           max_tokens=400, threads=2)
    server = make_server(student, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["sec-student:v1"]
        schema = answer_schema(task)
        for text in (SENTENCE, "Words such as anticipate and believe identify forward-looking statements."):
            reply = client.chat.completions.create(
                model="qwen2.5-7b-instruct",  # the teacher's model name: ignored, the student answers
                messages=[{"role": "system", "content": "You extract corporate events."},
                          {"role": "user", "content": f"Sentence: {text}"}])
            answer = reply.choices[0].message.content
            jsonschema.validate(json.loads(answer), schema)  # a random tiny model, held to the task grammar
            assert reply.model == "sec-student:v1" and reply.usage.completion_tokens > 0
        # Without the grammar the same random model does not produce valid answers: the grammar did the work.
        free = client.chat.completions.create(model="x", messages=[{"role": "user", "content": SENTENCE}],
                                              max_tokens=24, extra_body={"grammar": ""})
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(free.choices[0].message.content), schema)
    finally:
        server.shutdown()
        server.server_close()
