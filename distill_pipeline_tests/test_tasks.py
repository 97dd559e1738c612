import json

from distill_pipeline.config import load_config, TaskConfig
from distill_pipeline.stages.tasks import parse_output

DEMO = load_config(env={}).task
EVENT = {"event_type": "acquisition", "subject": "Apex Inc.", "object": "Birch LLC", "magnitude_class": "major",
         "timing": "completed", "sentiment": "positive", "materiality": "material", "event_date": "2025-03-01"}


def test_extraction_event_is_canonicalized():
    shuffled = dict(reversed(list(EVENT.items())), confidence=9)  # extra keys are dropped
    parsed = parse_output(DEMO, json.dumps(shuffled))
    assert parsed.ok and parsed.label == "acquisition"
    assert list(json.loads(parsed.target)) == list(DEMO.fields)


def test_extraction_skip_is_a_valid_answer():
    parsed = parse_output(DEMO, '```json\n{"skip": true}\n```')
    assert parsed.ok and parsed.label == "skip" and parsed.target == '{"skip": true}'


def test_extraction_errors_name_the_field():
    assert "not valid JSON" in parse_output(DEMO, '{"event_type": "acq').error
    assert "'subject'" in parse_output(DEMO, json.dumps({k: v for k, v in EVENT.items() if k != "subject"})).error
    assert "'magnitude_class'" in parse_output(DEMO, json.dumps({**EVENT, "magnitude_class": "huge"})).error
    assert "'event_date'" in parse_output(DEMO, json.dumps({**EVENT, "event_date": "March 1"})).error
    assert parse_output(DEMO, None).error == "teacher output is NULL"


def test_classification_and_regression_and_generation():
    cls = TaskConfig(kind="classification", labels=["billing", "bug"])
    assert parse_output(cls, ' "bug" ').target == "bug"
    assert parse_output(cls, '{"label": "billing"}').label == "billing"
    assert not parse_output(cls, "refund").ok
    reg = TaskConfig(kind="regression", fields={"quality": {"type": "number", "minimum": 0, "maximum": 10},
                                                "novelty": {"type": "integer"}})
    ok = parse_output(reg, '{"novelty": 3, "quality": 7.5}')
    assert ok.ok and ok.target == '{"quality": 7.5, "novelty": 3}' and ok.label == "quality=8"
    assert "maximum" in parse_output(reg, '{"novelty": 3, "quality": 11}').error
    gen = TaskConfig(kind="generation")
    assert parse_output(gen, "  SELECT 1;  ").target == "SELECT 1;"
