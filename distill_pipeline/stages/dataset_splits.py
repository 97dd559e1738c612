"""dataset_splits: train/val/test that are sticky, stratified and leakage-free.

- Leakage-free: the unit of assignment is the duplicate cluster (its `cluster_key`),
  so near-duplicates never land in two splits; clusters between which the leakage
  check would still find a near-duplicate pair are assigned as one (`leakage_units`).
- Sticky: every cluster ever assigned is recorded in assignments.parquet; a cluster
  keeps its split on every later run, unless new rows join it to a cluster of
  another split (then leakage-freedom wins: the merged unit takes one split).
- Stratified: new clusters fill, stratum by stratum (the label: event type or
  "skip"), the gap between each split's target share and what it already holds;
  within a stratum new clusters are ordered by a stable hash of salt + key, so
  the result is a pure function of (previous assignments, current data).
- Incremental: a later run looks up only its new examples for leakage pairs
  (stages/split_state.py); the assignment itself is cheap and runs over all.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill_pipeline.clients.tracking import file_sha256
from distill_pipeline.config import CurateConfig, PipelineConfig, SplitConfig
from distill_pipeline.stages import split_state

SPLITS = ("train", "val", "test")
HF_NAMES = {"train": "train", "val": "validation", "test": "test"}
ASSIGNMENTS = "assignments.parquet"
MANIFEST = "manifest.json"


def build_dataset_splits(cfg: PipelineConfig, prompt_version: str) -> dict:
    """The stage: this version's curated examples assigned and written; returns the manifest."""
    from distill_pipeline.stages.curated_examples import read_examples

    return write_splits(read_examples(cfg, prompt_version), cfg.split, cfg.stage_dir("dataset_splits", prompt_version),
                        prompt_version, curate=cfg.curate)


def stable_hash(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest(), "big")


def _allocate(n_new: int, have: dict[str, int], shares: dict[str, float]) -> list[str]:
    """Split names for `n_new` new clusters so that have+new approaches the target shares."""
    total = sum(have.values()) + n_new
    deficit = {s: max(0.0, shares[s] * total - have[s]) for s in SPLITS}
    budget = sum(deficit.values())
    if budget <= 0:
        deficit, budget = dict(shares), 1.0
    exact = {s: n_new * deficit[s] / budget for s in SPLITS}
    counts = {s: int(exact[s]) for s in SPLITS}
    # largest remainder; ties go to train, then val, then test
    for s in sorted(SPLITS, key=lambda s: (-(exact[s] - counts[s]), SPLITS.index(s)))[: n_new - sum(counts.values())]:
        counts[s] += 1
    return [s for s in SPLITS for _ in range(counts[s])]


def assign_splits(examples: pa.Table, cfg: SplitConfig, previous: dict[str, str] | None = None,
                  units: dict[str, str] | None = None) -> dict[str, str]:
    """cluster_key -> split for every cluster in `examples` (plus all `previous` assignments).

    `units` (cluster_key -> unit key, see `leakage_units`) puts clusters that must stay together
    in one split: the unit keeps the previous split of its first member (by key, so the unit key
    first) that had one.
    """
    previous = dict(previous or {})
    units = units or {}
    shares = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    keys = examples.column("cluster_key").to_pylist()
    labels = examples.column("label").to_pylist()
    stratum_of: dict[str, str] = {}
    members: dict[str, set[str]] = defaultdict(set)
    for key, label in zip(keys, labels):
        unit = units.get(key, key)
        stratum_of.setdefault(unit, str(label))
        members[unit].add(key)
    have: dict[str, Counter] = defaultdict(Counter)
    new: dict[str, list[str]] = defaultdict(list)
    result = previous
    for unit, stratum in stratum_of.items():
        # The unit key is its smallest member, so sorted members try it first.
        before = next((previous[k] for k in sorted(members[unit]) if k in previous), None)
        if before is None:
            new[stratum].append(unit)
            continue
        have[stratum][before] += 1
        for key in members[unit]:  # leakage-free wins over stickiness for a merged cluster
            result[key] = before
    for stratum, fresh in sorted(new.items()):
        fresh.sort(key=lambda k: stable_hash(cfg.salt, k))  # the hash decides who goes where
        counts = {s: have[stratum].get(s, 0) for s in SPLITS}
        for unit, name in zip(fresh, _allocate(len(fresh), counts, shares)):
            for key in members[unit]:
                result[key] = name
    return result


def _near_duplicate_pairs(texts: pa.Array, ids: pa.Array, curate: CurateConfig) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs among the normalized `texts`, as indices into them.

    The leakage check finds every pair exactly (stages/checks.py), so the detector runs here at far
    higher recall than curation's: 4 rows per band (a pair at J = 0.8 is missed with probability
    ~1e-7 instead of ~5e-2 at 8 rows), no estimate prefilter, and wider windows in huge buckets. Its
    shortcuts depend on the order of the texts, so they come in one canonical order (normalized text,
    then id) and the result is a function of the examples alone.
    """
    from distill_pipeline.stages.dedup import find_near_duplicates

    if len(texts) == 0:
        return []
    order = pc.sort_indices(pa.table({"text": texts, "id": pc.cast(ids, pa.string())}),
                            sort_keys=[("text", "ascending"), ("id", "ascending")]).to_numpy()
    p = split_state.split_params(curate)
    found = find_near_duplicates(texts.take(order), threshold=p.threshold, shingle_size=p.shingle_size,
                                 num_perm=p.num_perm, bands=p.bands, workers=p.workers,
                                 prefilter_sigmas=p.prefilter_sigmas, max_bucket_pairs=256, bucket_window=8)
    return [(int(order[i]), int(order[j]), float(sim)) for (i, j), sim in zip(found.pairs, found.similarity)]


def normalized_inputs(examples: pa.Table) -> pa.Array:
    from distill_pipeline.stages.curated_examples import normalize

    return normalize(examples.column("input").combine_chunks())


def leakage_units(examples: pa.Table, curate: CurateConfig) -> dict[str, str]:
    """cluster_key -> unit key (the smallest cluster_key of its unit), for clusters that must share a split.

    Curation clusters all rows, dropped duplicates included, and cuts corners on huge LSH
    buckets; among the kept examples alone a pair can surface that joins two of its
    clusters. Such clusters are merged here, so the leakage check cannot find them apart.
    """
    ids = pc.cast(examples.column("id"), pa.string()).to_pylist()
    pairs = _near_duplicate_pairs(normalized_inputs(examples), examples.column("id"), curate)
    return split_state.units_from_pairs(examples, [(ids[i], ids[j]) for i, j, _ in pairs])


def load_assignments(out_dir: Path) -> dict[str, str]:
    path = out_dir / ASSIGNMENTS
    if not path.exists():
        return {}
    t = pq.read_table(path)
    return dict(zip(t.column("cluster_key").to_pylist(), t.column("split").to_pylist()))


def label_shares(labels: list[str]) -> dict[str, float]:
    counts = Counter(labels)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items())}


def write_splits(examples: pa.Table, cfg: SplitConfig, out_dir: Path, prompt_version: str, *,
                 curate: CurateConfig) -> dict:
    """Assign, write {train,val,test}.parquet + a DatasetDict under hf/ + assignments; return the manifest.

    `curate` gives the near-duplicate settings the leakage check uses (see `leakage_units`).
    """
    from datasets import Dataset, DatasetDict  # heavy import, only when writing
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()

    out_dir.mkdir(parents=True, exist_ok=True)
    texts = normalized_inputs(examples)
    update = split_state.update(examples, texts, out_dir, curate) if curate.incremental else None
    if update is None:
        pairs = _near_duplicate_pairs(texts, examples.column("id"), curate)
        index, facts = split_state.full_index(examples, texts, pairs, curate), {"mode": "full"}
    else:
        index, checked = update
        facts = {"mode": "incremental", "pairs_checked": checked}
    units = split_state.units_from_pairs(examples, index.pairs)
    split_state.forget(out_dir)
    assignment = assign_splits(examples, cfg, load_assignments(out_dir), units)
    split_col = pa.array([assignment[k] for k in examples.column("cluster_key").to_pylist()], pa.string())
    columns = ["id", "input", "target", "label", "cluster_key", "confidence"]
    table = examples.select(columns).append_column("split", split_col)
    manifest = {"prompt_version": prompt_version, "splits": {}, "salt": cfg.salt,
                "clusters_merged_for_leakage": len(units), **facts}
    parts = {}
    for name in SPLITS:
        part = table.filter(pc.equal(table.column("split"), name)).drop_columns(["split"])
        path = out_dir / f"{name}.parquet"
        pq.write_table(part, path)
        parts[name] = part
        manifest["splits"][name] = {"rows": part.num_rows, "sha256": file_sha256(path), "path": str(path),
                                    "labels": dict(Counter(part.column("label").to_pylist()))}
    DatasetDict({HF_NAMES[n]: Dataset(parts[n]) for n in SPLITS}).save_to_disk(str(out_dir / "hf"))
    keys = sorted(assignment)
    pq.write_table(pa.table({"cluster_key": keys, "split": [assignment[k] for k in keys]}), out_dir / ASSIGNMENTS)
    manifest["label_shares"] = label_shares(table.column("label").to_pylist())
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    split_state.save(out_dir, index, curate)
    return manifest


def read_splits(out_dir: Path) -> dict[str, pa.Table]:
    return {name: pq.read_table(out_dir / f"{name}.parquet") for name in SPLITS}
