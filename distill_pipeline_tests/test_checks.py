"""The asset checks fail on bad data: each recomputes what it guards without the code that produced it."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.config import load_config
from distill_pipeline.demo.data import generate_rows, source_table
from distill_pipeline.stages import checks, curated_examples, dataset_splits
from distill_pipeline.stages.tasks import Parsed

CFG = load_config(env={})  # the demo config: SEC events extraction
GOOD = {"event_type": "acquisition", "subject": "Apex Inc.", "object": "Birch LLC", "magnitude_class": "major",
        "timing": "completed", "sentiment": "positive", "materiality": "material", "event_date": "2025-05-02"}


def write_examples(path, targets):
    pq.write_table(pa.table({"id": [str(i) for i in range(len(targets))], "target": targets}), path)
    return path


@pytest.fixture(scope="module")
def demo_curated():
    return curated_examples.curate_table(source_table(list(generate_rows(1500, seed=7))), CFG)


def test_schema_check_passes_curated_demo_targets(tmp_path, demo_curated):
    path = tmp_path / "examples.parquet"
    pq.write_table(demo_curated.examples, path)
    checked, bad, shown = checks.targets_violating_schema(CFG.task, path)
    assert checked == demo_curated.examples.num_rows > 500 and bad == 0, shown


@pytest.mark.parametrize("target, problem", [
    ({**GOOD, "event_type": "merger"}, "is not one of"),  # not in the enum
    ({k: v for k, v in GOOD.items() if k != "subject"}, "'subject' is a required property"),
    ({**GOOD, "extra": 1}, "Additional properties"),
    ({**GOOD, "event_date": "May 2"}, "is not a 'date'"),
    ({**GOOD, "object": 3}, "is not of type"),
    ({"skip": False}, "True was expected"),
])
def test_schema_check_fails_on_planted_bad_targets(tmp_path, target, problem):
    path = write_examples(tmp_path / "examples.parquet", [json.dumps(GOOD), json.dumps({"skip": True}),
                                                          json.dumps(target)])
    checked, bad, shown = checks.targets_violating_schema(CFG.task, path)
    assert (checked, bad) == (3, 1) and shown[0]["id"] == "2" and problem in shown[0]["problem"], shown


def test_schema_check_catches_a_parser_that_lets_bad_answers_through(tmp_path, monkeypatch):
    """The check does not trust the parser: with a parser bug, the written targets fail the schema."""
    rows = source_table(list(generate_rows(300, seed=3)))
    permissive = lambda task, raw: Parsed(ok=True, target=raw, label="x", value=raw)  # noqa: E731
    monkeypatch.setattr(curated_examples, "parse_output", permissive)
    result = curated_examples.curate_table(rows, CFG)
    path = tmp_path / "examples.parquet"
    pq.write_table(result.examples, path)
    assert checks.targets_violating_schema(CFG.task, path)[1] > 0


def test_schema_check_for_classification(tmp_path):
    task = load_config(env={"DISTILL__TASK": '{"kind": "classification", "labels": ["billing", "outage"]}'}).task
    path = write_examples(tmp_path / "examples.parquet", ["billing", "outage", "refund"])
    checked, bad, shown = checks.targets_violating_schema(task, path)
    assert (checked, bad) == (3, 1) and shown[0]["target"] == "refund"


def test_leakage_check_fails_when_the_splitter_keeps_no_near_duplicates_together(tmp_path, monkeypatch,
                                                                                  demo_curated):
    """On the demo's own data: without the splitter's merge step near duplicates straddle splits, and the
    check (its own detector) finds them; with it, the same data passes."""
    kept = tmp_path / "kept"
    dataset_splits.write_splits(demo_curated.examples, CFG.split, kept, "pv", curate=CFG.curate)
    ok, detail = checks.check_leakage(dataset_splits.read_splits(kept), 0.8, 3)
    assert ok, detail

    monkeypatch.setattr(dataset_splits, "_near_duplicate_pairs", lambda *args, **kwargs: [])
    broken = tmp_path / "broken"
    dataset_splits.write_splits(demo_curated.examples, CFG.split, broken, "pv", curate=CFG.curate)
    ok, detail = checks.check_leakage(dataset_splits.read_splits(broken), 0.8, 3)
    assert not ok and detail["near_duplicate_pairs_across_splits"] >= 1
    assert all(e["jaccard"] >= 0.8 and e["splits"][0] != e["splits"][1] for e in detail["examples"])


def test_answers_mostly_usable_fails_on_a_bad_teacher():
    assert checks.answers_mostly_usable({"ok": 95, "failed": 5}, 100, 0.05) == (True, 0.05)
    assert checks.answers_mostly_usable({"ok": 90, "failed": 6, "invalid": 4}, 100, 0.05) == (False, 0.1)
    # inputs that were never answerable do not count against the teacher
    assert checks.answers_mostly_usable({"ok": 50, "invalid_input": 50}, 100, 0.0) == (True, 0.0)


def test_the_leakage_checks_shingle_ids_are_the_shingles_themselves():
    """Packed code points, not hashes: the Jaccard from the ids equals the one from the strings, for short
    texts, empty ones and characters outside the BMP too."""
    from distill_pipeline.stages.checks import _shingle_table
    from distill_pipeline.stages.dedup import jaccard

    texts = ["ab", "", "abc", "abcab", "zé😀x zé😀y", "zé😀x zé😀z", "a", "aa"]
    doc, ids = _shingle_table(texts, 3)
    sets = [set(ids[doc == d].tolist()) for d in range(len(texts))]
    for i in range(len(texts)):
        for j in range(len(texts)):
            if texts[i] and texts[j]:
                assert len(sets[i] & sets[j]) / len(sets[i] | sets[j]) == jaccard(texts[i], texts[j], 3), (i, j)


def _parts(texts: dict[str, list[tuple[str, str]]]) -> dict[str, pa.Table]:
    return {name: pa.table({"id": [i for i, _ in rows], "input": [t for _, t in rows],
                            "cluster_key": [f"k{i}" for i, _ in rows]}) for name, rows in texts.items()}


def test_the_leakage_check_remembers_what_passed_and_still_catches_a_new_pair(tmp_path):
    memory = tmp_path / "leakage_passed.json"
    base = {"train": [(f"t{i}", f"{WORDS[i % 7]} distinct sentence number {i} about the quarter") for i in range(60)],
            "val": [("v1", "the board approved a special dividend of two dollars"),
                    ("v2", "an auditor was dismissed after the restatement")],
            "test": [("s1", "guidance for the fiscal year was raised by ten percent")]}
    ok, detail = checks.check_leakage(_parts(base), 0.8, 3, memory=memory)
    assert ok and detail["rows_checked_before"] == 0 and memory.is_file()
    ok, detail = checks.check_leakage(_parts(base), 0.8, 3, memory=memory)
    assert ok and detail["rows_checked_before"] == 63
    # a new row in test, a near duplicate of an old row in val: found although val's rows passed before
    night = {**base, "test": base["test"] + [("s2", "the board approved a special dividend of two dollars.")]}
    ok, detail = checks.check_leakage(_parts(night), 0.8, 3, memory=memory)
    assert not ok and detail["near_duplicate_pairs_across_splits"] == 1 and detail["rows_checked_before"] == 63
    assert not memory.exists()  # a failed check forgets what passed
    # an old row that moved split is looked at again
    checks.check_leakage(_parts(base), 0.8, 3, memory=memory)
    moved = {"train": base["train"], "val": base["val"][1:],
             "test": base["test"] + [("v1", "the board approved a special dividend of two dollars"),
                                     ("s3", "the board approved a special dividend of two dollars!")]}
    ok, detail = checks.check_leakage(_parts(moved), 0.8, 3, memory=memory)
    assert ok and detail["rows_checked_before"] == 62  # v1 and s3 in one split: no leak, v1 rechecked


WORDS = ("acquire", "bond", "cash", "debt", "equity", "fund", "grant")
