"""Incremental leakage units: a night's new examples are compared with the stored ones only.

Next to the splits, dataset_splits keeps (state/ under its stage directory):
  index.arrow    every example it assigned: id, a hash of its input, its cluster_key, and the MinHash
                 band keys of its normalized input at the split stage's recall (4 rows per band, see
                 dataset_splits._near_duplicate_pairs)
  pairs.arrow    the verified near-duplicate pairs (id_a, id_b) found among the examples
  settings.json  the near-duplicate settings the index was built with

A later run looks up the new examples (and the neighbours of examples that are gone, whose links
may have run through them, and the examples whose cluster curation renamed, whose pairs may now join
two clusters) in the stored band keys, verifies the candidates exactly, and adds the pairs that pass.
The units are the clusters those pairs join, as in a full run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from distill_pipeline.config import CurateConfig
from distill_pipeline.stages import dedup, text_index

STATE_DIR = "state"
INDEX, PAIRS, SETTINGS = "index.arrow", "pairs.arrow", "settings.json"
# More new examples than this share: a full pass costs about the same, and finds pairs in one order.
MAX_INCREMENTAL_SHARE = 0.3
MAX_CANDIDATES_PER_TEXT = 512


def split_params(curate: CurateConfig) -> dedup.Params:
    """The split stage's detector: curation's similarity, at far higher recall (4 rows per band)."""
    return dedup.Params(threshold=curate.near_duplicate_threshold, shingle_size=curate.shingle_size,
                        num_perm=curate.num_perm, bands=curate.num_perm // 4, workers=curate.workers,
                        prefilter_sigmas=None)


def settings_digest(curate: CurateConfig) -> str:
    settings = {"threshold": curate.near_duplicate_threshold, "shingle_size": curate.shingle_size,
                "num_perm": curate.num_perm}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def input_hashes(examples: pa.Table) -> np.ndarray:
    if not examples.num_rows:
        return np.zeros(0, np.uint64)
    return pd.util.hash_pandas_object(examples.select(["input"]).to_pandas(), index=False).to_numpy(np.uint64)


@dataclass
class Index:
    """What the next run needs, aligned with the examples of this one."""
    ids: pa.Array
    hashes: np.ndarray
    cluster_keys: pa.Array
    signatures: text_index.Signatures
    pairs: np.ndarray  # (m, 2) object array of example ids


def full_index(examples: pa.Table, texts: pa.Array, pairs: list[tuple[int, int, float]],
               curate: CurateConfig) -> Index:
    """The index after a full leakage pass over `examples` (`texts`: their normalized inputs)."""
    ids = pc.cast(examples.column("id"), pa.string()).combine_chunks()
    sig = text_index.signatures(texts, split_params(curate), sketches=False)
    id_list = ids.to_pylist()
    return Index(ids, input_hashes(examples), examples.column("cluster_key").combine_chunks(), sig,
                 np.array([(id_list[i], id_list[j]) for i, j, _ in pairs], dtype=object).reshape(-1, 2))


def load(out_dir: Path, curate: CurateConfig) -> tuple[pa.Table, np.ndarray] | None:
    base = out_dir / STATE_DIR
    try:
        if json.loads((base / SETTINGS).read_text())["digest"] != settings_digest(curate):
            return None
        index = text_index.read(base / INDEX)
        pairs = text_index.read(base / PAIRS)
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    edges = np.stack([pairs.column("id_a").to_numpy(zero_copy_only=False),
                      pairs.column("id_b").to_numpy(zero_copy_only=False)], axis=1).astype(object) \
        if pairs.num_rows else np.zeros((0, 2), object)
    return index, edges


def forget(out_dir: Path) -> None:
    (out_dir / STATE_DIR / SETTINGS).unlink(missing_ok=True)


def save(out_dir: Path, index: Index, curate: CurateConfig) -> None:
    base = out_dir / STATE_DIR
    base.mkdir(parents=True, exist_ok=True)
    forget(out_dir)
    text_index.write(base / INDEX, {"id": index.ids, "input_hash": pa.array(index.hashes, pa.uint64()),
                                    "cluster_key": index.cluster_keys}, index.signatures)
    text_index.write(base / PAIRS, {"id_a": pa.array(index.pairs[:, 0].tolist(), pa.string()),
                                    "id_b": pa.array(index.pairs[:, 1].tolist(), pa.string())}, None)
    (base / SETTINGS).write_text(json.dumps({"digest": settings_digest(curate)}))


def update(examples: pa.Table, texts: pa.Array, out_dir: Path, curate: CurateConfig) -> tuple[Index, int] | None:
    """(the index for `examples`, pairs checked) from the stored one, or None when a full pass is due.

    `texts`: the examples' normalized inputs, in their order.
    """
    stored = load(out_dir, curate)
    if stored is None:
        return None
    index, edges = stored
    ids = pc.cast(examples.column("id"), pa.string()).combine_chunks()
    if pc.count_distinct(ids).as_py() != len(ids):
        return None
    hashes = input_hashes(examples)
    at = pc.index_in(ids, value_set=index.column("id").combine_chunks())
    found = at.is_valid().to_numpy(zero_copy_only=False)
    same = np.zeros(len(ids), bool)
    stored_at = pc.drop_null(at).to_numpy()
    same[found] = index.column("input_hash").to_numpy()[stored_at] == hashes[found]
    params = split_params(curate)
    stored_sig = text_index.from_table(index, params.bands)

    # Pairs whose examples are both still here, unchanged, stand; the others' partners are looked up again.
    id_list = ids.to_pylist()
    unchanged = {id_list[i] for i in np.flatnonzero(same)}
    keep = np.array([a in unchanged and b in unchanged for a, b in edges], bool) if len(edges) else np.zeros(0, bool)
    broken = {x for pair in edges[~keep] for x in pair if x in unchanged}
    renamed = np.zeros(len(ids), bool)
    if "cluster_key" in index.column_names:
        stored_keys = index.column("cluster_key").combine_chunks().take(pa.array(stored_at))
        renamed[found] = pc.not_equal(stored_keys, examples.column("cluster_key").combine_chunks()
                                      .filter(pa.array(found))).fill_null(True).to_numpy(zero_copy_only=False)
    query = ~same | renamed
    if broken:
        query |= pc.is_in(ids, value_set=pa.array(sorted(broken), pa.string())).to_numpy(zero_copy_only=False)
    if query.sum() > MAX_INCREMENTAL_SHARE * max(len(ids), 1):
        return None

    keys = np.zeros((len(ids), params.bands), np.uint64)
    sames = np.flatnonzero(same)
    keys[sames] = stored_sig.keys[pc.filter(at, pa.array(same)).to_numpy()]
    fresh = np.flatnonzero(~same)
    if fresh.size:
        keys[fresh] = text_index.signatures(texts.take(pa.array(fresh)), params, sketches=False).keys
    sig = text_index.Signatures(keys, np.zeros((len(ids), 0), np.uint8))
    asked = np.flatnonzero(query)
    pairs = text_index.candidates(sig.take(asked), sig, max_per_text=MAX_CANDIDATES_PER_TEXT)
    pairs[:, 0] = asked[pairs[:, 0]]
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, axis=1), axis=0) if len(pairs) else pairs
    checked = len(pairs)
    found_pairs, _ = text_index.similar_pairs(texts, texts, pairs, params)
    new_edges = np.array([(id_list[i], id_list[j]) for i, j in found_pairs], dtype=object).reshape(-1, 2)
    return Index(ids, hashes, examples.column("cluster_key").combine_chunks(), sig,
                 np.concatenate([edges[keep], new_edges])), checked


def units_from_pairs(examples: pa.Table, pairs: np.ndarray) -> dict[str, str]:
    """cluster_key -> unit key (the smallest cluster_key of its unit), for clusters the pairs join."""
    key_of = dict(zip(pc.cast(examples.column("id"), pa.string()).to_pylist(),
                      examples.column("cluster_key").to_pylist()))
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while k in parent:
            k = parent[k]
        return k

    for a, b in pairs:
        ra, rb = root(key_of[a]), root(key_of[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {k: root(k) for k in parent}
