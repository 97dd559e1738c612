"""dataset_splits: sticky, stratified, leakage-free."""

import random
from collections import Counter

import pyarrow as pa
from datasets import load_from_disk

from distill_pipeline.config import load_config
from distill_pipeline.demo.data import generate_rows, source_table
from distill_pipeline.stages.curated_examples import curate_table
from distill_pipeline.stages.checks import check_label_balance, check_leakage
from distill_pipeline.stages.dataset_splits import (assign_splits, leakage_units,
                                           load_assignments, read_splits, write_splits)

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
    write_splits(first, CFG.split, out, "pv", curate=CFG.curate)
    before = load_assignments(out)
    grown = pa.concat_tables([first, examples(start=10_000).slice(0, 80)])
    write_splits(grown, CFG.split, out, "pv", curate=CFG.curate)
    after = load_assignments(out)
    assert all(after[k] == v for k, v in before.items())
    assert len(after) == len(before) + 80
    # a row that disappears and comes back keeps its split too
    write_splits(first.slice(0, 10), CFG.split, out, "pv", curate=CFG.curate)
    assert load_assignments(out) == after
    # and a from-scratch run on the same data gives the same assignment (pure function of data + history)
    assert assign_splits(first, CFG.split) == before


def test_written_splits_and_datasetdict(tmp_path):
    out = tmp_path / "splits"
    manifest = write_splits(examples(), CFG.split, out, "pv", curate=CFG.curate)
    parts = read_splits(out)
    assert sum(p.num_rows for p in parts.values()) == 300
    assert manifest["splits"]["train"]["rows"] == parts["train"].num_rows and len(manifest["splits"]["val"]["sha256"]) == 64
    dd = load_from_disk(str(out / "hf"))
    assert set(dd) == {"train", "validation", "test"} and dd["validation"].num_rows == parts["val"].num_rows
    assert check_label_balance(parts, CFG.split.max_label_share_gap)[0]
    ok, detail = check_leakage(parts, CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)
    assert ok, detail


def test_leakage_check_fails_on_a_planted_near_duplicate_pair():
    parts = read_splits_like({
        "train": ["Apex Inc. completed the acquisition of Birch LLC for $400 million on May 2, 2025.",
                  "Our results may fluctuate due to changes in interest rates."],
        "val": ["Apex Inc. completed the acquisition of Birch LLC for $410 million on May 2, 2025"],
        "test": ["The Board appointed Jane Alvarez as Chief Financial Officer, effective June 1, 2025."],
    })
    ok, detail = check_leakage(parts, CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)
    assert not ok and detail["near_duplicate_pairs_across_splits"] == 1
    assert sorted(detail["examples"][0]["splits"]) == ["train", "val"]


def test_leakage_check_reports_every_crossing_pair_and_none_within_a_split():
    base = "Apex Inc. completed the acquisition of Birch LLC for $400 million on May 2, 2025."
    other = "The Board appointed Jane Alvarez as Chief Financial Officer, effective June 1, 2025."
    parts = read_splits_like({"train": [base, other], "val": ["an unrelated sentence about quarterly dividends."],
                              "test": [base.replace("400", "410"), other]})
    ok, detail = check_leakage(parts, CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)
    assert not ok and detail["near_duplicate_pairs_across_splits"] == 2
    assert {tuple(sorted(e["splits"])) for e in detail["examples"]} == {("test", "train")}
    assert {e["jaccard"] for e in detail["examples"]} >= {1.0}
    together = read_splits_like({"train": [base, base.replace("400", "410")], "val": [other, other],
                                 "test": ["an unrelated sentence about quarterly dividends."]})
    assert check_leakage(together, CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)[0]


def test_clusters_joined_by_a_near_duplicate_pair_share_a_split(tmp_path):
    table = examples()
    n = table.num_rows
    inputs = table.column("input").to_pylist()
    # Two rows curation left in different clusters although their inputs are near duplicates,
    # placed where a plain per-cluster assignment sends them to different splits.
    before = assign_splits(table, CFG.split)
    keys = table.column("cluster_key").to_pylist()
    i = next(k for k in range(n) if before[keys[k]] == "train")
    j = next(k for k in range(n) if before[keys[k]] == "test" and table.column("label")[k] == table.column("label")[i])
    inputs[j] = inputs[i] + " ."
    table = table.set_column(1, "input", pa.array(inputs))
    assert leakage_units(table, CFG.curate) == {max(keys[i], keys[j]): min(keys[i], keys[j])}
    out = tmp_path / "splits"
    manifest = write_splits(table, CFG.split, out, "pv", curate=CFG.curate)
    assigned = load_assignments(out)
    assert assigned[keys[i]] == assigned[keys[j]] and manifest["clusters_merged_for_leakage"] == 1
    assert check_leakage(read_splits(out), CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)[0]


def test_merged_clusters_follow_the_unit_keys_previous_split():
    table = examples()
    keys = table.column("cluster_key").to_pylist()
    previous = {keys[0]: "test", keys[1]: "train"}
    units = {keys[1]: keys[0]}  # keys[0] < keys[1]: the unit is known by keys[0]
    assignment = assign_splits(table, CFG.split, previous, units)
    assert assignment[keys[0]] == assignment[keys[1]] == "test"
    # a unit whose key is new keeps the split its assigned member had
    assignment = assign_splits(table, CFG.split, {keys[1]: "val"}, units)
    assert assignment[keys[0]] == assignment[keys[1]] == "val"


def test_curated_demo_data_splits_without_leakage(tmp_path):
    # Regression: on the demo's 5,000 rows curation's clusters once left a J=0.81 pair in two splits.
    curated = curate_table(source_table(list(generate_rows(5000, seed=7))), CFG)
    out = tmp_path / "splits"
    write_splits(curated.examples, CFG.split, out, "pv", curate=CFG.curate)
    ok, detail = check_leakage(read_splits(out), CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)
    assert ok, detail


def test_leakage_check_fails_when_a_cluster_key_spans_two_splits():
    parts = read_splits_like({"train": ["alpha beta gamma delta"], "val": ["completely different words here"],
                              "test": ["and a third unrelated sentence"]}, same_key=True)
    ok, detail = check_leakage(parts, CFG.curate.near_duplicate_threshold, CFG.curate.shingle_size)
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
