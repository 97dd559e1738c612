"""dataset_splits: sticky, stratified, leakage-free."""

import random
from collections import Counter

import pyarrow as pa
from datasets import load_from_disk

from distill_pipeline.config import load_config
from distill_pipeline.stages.split import (assign_splits, check_label_balance, check_leakage, load_assignments,
                                           read_splits, write_splits)

CFG = load_config(env={})
LABELS = ["skip"] * 60 + ["acquisition"] * 25 + ["layoffs"] * 10 + ["restatement"] * 5


WORDS = ("acquire bond cash debt equity fund grant hedge index lease merger note option profit quota rate "
         "share stock tax unit vote warrant yield zone audit board claim deal exit filing growth loss").split()


def distinct_text(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.sample(WORDS, 10)) + f" {i}"


def examples(n_extra: int = 0, start: int = 0):
    labels = LABELS * 3 + LABELS[: n_extra]
    n = len(labels)
    ids = [str(start + i) for i in range(n)]
    return pa.table({
        "id": ids,
        "input": [distinct_text(i) for i in range(start, start + n)],
        "target": ['{"skip": true}'] * n,
        "label": labels,
        "cluster_key": [f"k{start + i}" for i in range(n)],
        "confidence": [9.0] * n,
    })


def test_fresh_assignment_is_stratified():
    table = examples()
    assignment = assign_splits(table, CFG.split)
    per_label = Counter((label, assignment[k]) for k, label in zip(table.column("cluster_key").to_pylist(),
                                                                    table.column("label").to_pylist()))
    for label, total in Counter(LABELS * 3).items():
        for split, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            assert abs(per_label[(label, split)] - share * total) <= 1, (label, split)


def test_assignment_is_sticky_as_rows_arrive(tmp_path):
    out = tmp_path / "splits"
    first = examples()
    write_splits(first, CFG.split, out, "pv")
    before = load_assignments(out)
    grown = pa.concat_tables([first, examples(start=10_000).slice(0, 80)])
    write_splits(grown, CFG.split, out, "pv")
    after = load_assignments(out)
    assert all(after[k] == v for k, v in before.items())
    assert len(after) == len(before) + 80
    # a row that disappears and comes back keeps its split too
    write_splits(first.slice(0, 10), CFG.split, out, "pv")
    assert load_assignments(out) == after
    # and a from-scratch run on the same data gives the same assignment (pure function of data + history)
    assert assign_splits(first, CFG.split) == before


def test_written_splits_and_datasetdict(tmp_path):
    out = tmp_path / "splits"
    manifest = write_splits(examples(), CFG.split, out, "pv")
    parts = read_splits(out)
    assert sum(p.num_rows for p in parts.values()) == 300
    assert manifest["splits"]["train"]["rows"] == parts["train"].num_rows and len(manifest["splits"]["val"]["sha256"]) == 64
    dd = load_from_disk(str(out / "hf"))
    assert set(dd) == {"train", "validation", "test"} and dd["validation"].num_rows == parts["val"].num_rows
    assert check_label_balance(parts, CFG.split.max_label_share_gap)[0]
    ok, detail = check_leakage(parts, CFG.curate)
    assert ok, detail


def test_leakage_check_fails_on_a_planted_near_duplicate_pair():
    parts = read_splits_like({
        "train": ["Apex Inc. completed the acquisition of Birch LLC for $400 million on May 2, 2025.",
                  "Our results may fluctuate due to changes in interest rates."],
        "val": ["Apex Inc. completed the acquisition of Birch LLC for $410 million on May 2, 2025"],
        "test": ["The Board appointed Jane Alvarez as Chief Financial Officer, effective June 1, 2025."],
    })
    ok, detail = check_leakage(parts, CFG.curate)
    assert not ok and detail["near_duplicate_pairs_across_splits"] == 1
    assert sorted(detail["examples"][0]["splits"]) == ["train", "val"]


def test_leakage_check_fails_when_a_cluster_key_spans_two_splits():
    parts = read_splits_like({"train": ["alpha beta gamma delta"], "val": ["completely different words here"],
                              "test": ["and a third unrelated sentence"]}, same_key=True)
    ok, detail = check_leakage(parts, CFG.curate)
    assert not ok and detail["clusters_in_two_splits"] == 1


def read_splits_like(texts: dict[str, list[str]], same_key: bool = False) -> dict[str, pa.Table]:
    parts = {}
    for s, items in texts.items():
        parts[s] = pa.table({"id": [f"{s}{i}" for i in range(len(items))], "input": items,
                             "target": ["x"] * len(items), "label": ["skip"] * len(items),
                             "cluster_key": ["same" if same_key and s != "test" else f"{s}{i}"
                                             for i in range(len(items))],
                             "confidence": [9.0] * len(items)})
    return parts
