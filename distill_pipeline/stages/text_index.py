"""A stored LSH index of texts (Arrow files), so that a night's new texts are compared with the old ones only.

Curation and the split stage keep, next to their outputs, the MinHash band keys (and, for
curation, the 4-bit sketches) of every text they judged. A later run computes signatures for
its new texts alone and finds their candidates among the stored ones band by band (sorted
keys, `searchsorted`): the cost grows with the new texts and their buckets, not with the table.
Signatures are the detector's own (`dedup._signatures`), so a text gets the same keys in
both places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from distill_pipeline.stages import dedup


@dataclass
class Signatures:
    keys: np.ndarray  # (n, bands) uint64 band keys
    sketch: np.ndarray  # (n, bytes) uint8 packed 4-bit sketches (empty columns when not kept)

    def take(self, rows: np.ndarray) -> "Signatures":
        return Signatures(self.keys[rows], self.sketch[rows])

    def __len__(self) -> int:
        return len(self.keys)


def signatures(texts: pa.Array, params: dedup.Params, *, sketches: bool = True) -> Signatures:
    keys, sketch = dedup._signatures(dedup._as_string_array(texts), params)
    return Signatures(keys, sketch if sketches else np.zeros((len(keys), 0), np.uint8))


def concat(parts: list[Signatures]) -> Signatures:
    parts = [p for p in parts if len(p)] or parts[:1]
    return Signatures(np.concatenate([p.keys for p in parts]), np.concatenate([p.sketch for p in parts]))


def to_columns(sig: Signatures) -> dict[str, pa.Array]:
    """Band keys (and sketches) as fixed-size list columns of a Parquet table."""
    cols = {"band_keys": pa.FixedSizeListArray.from_arrays(pa.array(sig.keys.ravel(), pa.uint64()),
                                                           sig.keys.shape[1])}
    if sig.sketch.shape[1]:
        cols["sketch"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.sketch.ravel(), pa.uint8()),
                                                           sig.sketch.shape[1])
    return cols


def from_table(table: pa.Table, bands: int) -> Signatures:
    def matrix(name: str, dtype, width: int) -> np.ndarray:
        if name not in table.column_names or table.num_rows == 0:
            return np.zeros((table.num_rows, width if name == "band_keys" else 0), dtype)
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return values.astype(dtype, copy=False).reshape(table.num_rows, -1)

    keys = matrix("band_keys", np.uint64, bands)
    if keys.shape[1] != bands:
        raise ValueError(f"stored index has {keys.shape[1]} bands, the settings ask for {bands}")
    return Signatures(keys, matrix("sketch", np.uint8, 0))


def candidates(new: Signatures, old: Signatures, *, max_per_text: int) -> np.ndarray:
    """(m, 2) pairs (new index, old index) that share at least one band key.

    A new text in a huge bucket (templated boilerplate) keeps only its `max_per_text` candidates
    that share the most bands with it: those are the likeliest near duplicates.
    """
    if not len(new) or not len(old):
        return np.zeros((0, 2), np.int64)
    parts = []
    for band in range(new.keys.shape[1]):
        col = old.keys[:, band]
        order = np.argsort(col, kind="stable")
        sorted_col = col[order]
        lo = np.searchsorted(sorted_col, new.keys[:, band], "left")
        hi = np.searchsorted(sorted_col, new.keys[:, band], "right")
        sizes = hi - lo
        hit = np.flatnonzero(sizes)
        if not hit.size:
            continue
        counts = sizes[hit]
        starts = np.repeat(lo[hit] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        parts.append(np.stack((np.repeat(hit, counts), order[starts]), axis=1))
    if not parts:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(parts).astype(np.int64)
    code = pairs[:, 0] * len(old) + pairs[:, 1]
    unique, shared = np.unique(code, return_counts=True)
    pairs = np.stack((unique // len(old), unique % len(old)), axis=1)
    # per new text, the most shared bands first; beyond max_per_text the rest are dropped
    order = np.lexsort((-shared, pairs[:, 0]))
    pairs = pairs[order]
    first = np.searchsorted(pairs[:, 0], pairs[:, 0], "left")
    return pairs[np.arange(len(pairs)) - first < max_per_text]


def agreement(a: np.ndarray, b: np.ndarray, num_perm: int) -> np.ndarray:
    """Matching 4-bit slots of sketch rows a[i], b[i] (the detector's estimate, see dedup._Clusters)."""
    x = a.view(np.uint64) ^ b.view(np.uint64)
    x |= x >> np.uint64(1)
    x |= x >> np.uint64(2)
    x &= np.uint64(0x1111111111111111)
    return 2 * num_perm - np.bitwise_count(x).sum(axis=1, dtype=np.int64)


def similar_pairs(new_texts: pa.Array, old_texts: pa.Array, pairs: np.ndarray, params: dedup.Params,
                  new: Signatures | None = None, old: Signatures | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The candidate (new, old) pairs whose exact shingle Jaccard reaches the threshold, and that Jaccard.

    With sketches on both sides, pairs the estimate puts far below the threshold (params.prefilter_sigmas)
    are not verified, as in the detector.
    """
    if len(pairs) and new is not None and old is not None and new.sketch.shape[1] and old.sketch.shape[1]:
        agree = agreement(new.sketch[pairs[:, 0]], old.sketch[pairs[:, 1]], params.num_perm)
        pairs = pairs[agree >= params.min_agreement()]
    if not len(pairs):
        return pairs, np.zeros(0)
    new_rows, new_local = np.unique(pairs[:, 0], return_inverse=True)
    old_rows, old_local = np.unique(pairs[:, 1], return_inverse=True)
    texts = pa.concat_arrays([dedup._as_string_array(new_texts).take(pa.array(new_rows)),
                              dedup._as_string_array(old_texts).take(pa.array(old_rows))])
    local = np.stack((new_local, old_local + len(new_rows)), axis=1)
    sim = dedup.exact_jaccard_pairs(texts, local, params.shingle_size, workers=params.workers,
                                    batch_pairs=params.verify_batch)
    ok = sim >= params.threshold - 1e-12
    return pairs[ok], sim[ok]


def write(path: Path, columns: dict[str, pa.Array], sig: Signatures | None) -> None:
    """An uncompressed Arrow file: random 64-bit keys do not compress, and it is read back memory-mapped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    feather.write_feather(pa.table({**columns, **(to_columns(sig) if sig is not None else {})}), tmp,
                          compression="uncompressed")
    tmp.replace(path)


def read(path: Path) -> pa.Table:
    return feather.read_table(path, memory_map=True)
