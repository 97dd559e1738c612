"""Near-duplicate detection: MinHash LSH over character shingles, every merge verified exactly.

Texts arrive already normalized and distinct (curation removes exact duplicates
first). Two texts are near duplicates when the Jaccard similarity of their sets of
character n-grams ("shingles"; a text shorter than n is one shingle) is at least
the threshold; clusters are the connected components of the verified pairs, so a
chain a~b~c puts a and c together even when J(a, c) is below the threshold.

How, and why this way (pure numpy over the Arrow string buffers, no per-text Python):
  1. Signatures, chunk by chunk (memory stays bounded; chunks run on `workers`
     threads, numpy releases the GIL): UTF-8 bytes -> code points -> one 64-bit
     hash per shingle -> one-permutation MinHash (the hash picks one of `num_perm`
     bins and a 32-bit value; each bin keeps its minimum), empty bins filled by
     rotation densification. Per text we keep only `bands` 64-bit band keys and a
     1-byte-per-slot signature (b-bit MinHash): 256 bytes at the defaults.
  2. Candidates: texts sharing a band key. Small buckets give all their pairs; a
     huge bucket (templated boilerplate) gives each member paired with the bucket's
     first member and with its neighbours in an order by the other bands' keys, so
     work stays linear in the bucket size.
  3. Prefilter: pairs whose 1-byte signatures agree on too few slots are dropped
     (cheap, vectorized); the margin below the threshold is wide (about 4 standard
     deviations of the estimate) so true pairs are not lost here.
  4. Verification: exact Jaccard of the shingle sets, recomputed for just the texts
     in candidate pairs (vectorized, exact code-point packing of shingles).
  5. Clusters: connected components of the verified pairs (min-label propagation);
     each text maps to the smallest index in its cluster.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

_MAX32 = np.uint32(0xFFFFFFFF)
_U64 = np.uint64
# Odd 64-bit constants for hashing (fixed: the same text always gets the same signature).
_POLY = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xFF51AFD7ED558CCD)
_M2 = _U64(0xC4CEB9FE1A85EC53)
_SHORT_TAG = _U64(0xD6E8FEB86659FD93)
_ROT = _U64(0xA0761D6478BD642F)
_BAND_MULT = np.random.default_rng(20261123).integers(1, 1 << 63, 4096, dtype=np.uint64) | _U64(1)


@dataclass(frozen=True)
class Params:
    threshold: float = 0.8
    shingle_size: int = 3
    num_perm: int = 128
    bands: int = 16
    workers: int = 2
    chunk_docs: int = 4096
    # A bucket larger than this is not expanded into all its pairs (see module doc).
    max_bucket_pairs: int = 16
    # In a huge bucket, each member is also paired with this many neighbours.
    bucket_window: int = 3
    # Candidates whose signatures agree on fewer than (threshold - margin) of the slots are dropped.
    prefilter_margin: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if not 1 <= self.shingle_size <= 16:
            raise ValueError(f"shingle_size={self.shingle_size} must be between 1 and 16")
        if self.num_perm < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"bands={self.bands} must divide num_perm={self.num_perm}")
        if self.num_perm > 4096:
            raise ValueError(f"num_perm={self.num_perm} is above 4096")
        if self.workers < 1 or self.chunk_docs < 1:
            raise ValueError("workers and chunk_docs must be at least 1")


# ---------------------------------------------------------------- exact reference

def shingles(text: str, shingle_size: int = 3) -> set[str]:
    """Character n-grams of `text`; a text shorter than n is one shingle (itself)."""
    if len(text) < shingle_size:
        return {text}
    return {text[i:i + shingle_size] for i in range(len(text) - shingle_size + 1)}


def jaccard(a: str, b: str, shingle_size: int = 3) -> float:
    """Exact Jaccard similarity of the two texts' shingle sets."""
    sa, sb = shingles(a, shingle_size), shingles(b, shingle_size)
    return len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------- text buffers

def _as_string_array(texts) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), pa.large_string())
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise TypeError(f"texts must be strings, got Arrow type {texts.type}")
    if texts.null_count:
        first = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"texts[{first}] is null; near-duplicate detection needs a text for every row")
    return texts


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets as int64, n+1 of them; the UTF-8 data buffer as uint8), zero copy."""
    _, off_buf, data_buf = arr.buffers()
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=width, count=len(arr) + 1, offset=arr.offset * np.dtype(width).itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data


def _codepoints(data: np.ndarray, boff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode UTF-8 (vectorized): code points of all texts and per-text char offsets."""
    if data.size == 0 or int(data.max()) < 0x80:  # ASCII: one byte, one char
        return data.astype(np.uint32), boff
    lead = (data & 0xC0) != 0x80
    before = np.concatenate(([0], np.cumsum(lead, dtype=np.int64)))
    pos = np.flatnonzero(lead)
    padded = np.concatenate((data, np.zeros(3, np.uint8))).astype(np.uint32)
    b0 = padded[pos]
    b1, b2, b3 = (padded[pos + i] & 0x3F for i in (1, 2, 3))
    cp = np.where(b0 < 0x80, b0,
         np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
         np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                  ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3)))
    return cp.astype(np.uint32), before[boff]


def _windows(coff: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shingles per text (at least 1), the start char of each shingle, and which texts are short."""
    lengths = np.diff(coff)
    short = lengths < k
    counts = np.where(short, 1, lengths - k + 1)
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    starts = np.arange(total, dtype=np.int64) + np.repeat(coff[:-1] - first, counts)
    return counts, starts, short


def _shingle_hashes(cp: np.ndarray, coff: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash per shingle (a fixed polynomial of the code points), and shingles per text."""
    counts, starts, short = _windows(coff, k)
    v = cp.astype(np.uint64) + _U64(1)
    total_chars = v.size
    if total_chars >= k:
        rolled = v[: total_chars - k + 1].copy()
        for j in range(1, k):
            rolled *= _POLY
            rolled += v[j: total_chars - k + 1 + j]
    else:
        rolled = np.zeros(0, np.uint64)
    if not short.any():
        return rolled[starts], counts
    h = np.zeros(starts.size, np.uint64)
    long_rows = ~np.repeat(short, counts)
    h[long_rows] = rolled[starts[long_rows]]
    # a short text: the polynomial of its chars, tagged with its length
    short_idx = np.flatnonzero(short)
    pos = np.cumsum(counts)[short_idx] - 1
    lengths = np.diff(coff)[short_idx]
    acc = np.zeros(short_idx.size, np.uint64)
    for j in range(k - 1):
        has = lengths > j
        acc[has] = acc[has] * _POLY + v[coff[short_idx[has]] + j]
    h[pos] = acc ^ (_SHORT_TAG * (lengths.astype(np.uint64) + _U64(1)))
    return h, counts


def _mix(h: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (in place): spreads every input bit over the output."""
    h ^= h >> _U64(33)
    h *= _M1
    h ^= h >> _U64(33)
    h *= _M2
    h ^= h >> _U64(33)
    return h


# ---------------------------------------------------------------- signatures

def _signature_chunk(data: np.ndarray, boff: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Band keys (n, bands) uint64 and 1-byte signatures (n, num_perm) for one chunk of texts."""
    n, K = len(boff) - 1, p.num_perm
    cp, coff = _codepoints(data[boff[0]: boff[-1]], boff - boff[0])
    h, counts = _shingle_hashes(cp, coff, p.shingle_size)
    h = _mix(h)
    bins = ((h >> _U64(32)) * _U64(K)) >> _U64(32)
    slot = np.repeat(np.arange(n, dtype=np.int64) * K, counts) + bins.astype(np.int64)
    sig = np.full(n * K, _MAX32, np.uint32)
    np.minimum.at(sig, slot, h.astype(np.uint32))
    sig = sig.reshape(n, K)
    _densify(sig)

    # band b takes slots b, b + bands, ...: interleaved, so that one band is not made of
    # neighbouring bins filled from the same source by densification. The key is a
    # multilinear hash of the band's values (a rare collision only adds a candidate).
    rows = K // p.bands
    banded = sig.reshape(n, rows, p.bands).transpose(0, 2, 1).astype(np.uint64)
    keys = (banded * _BAND_MULT[:rows]).sum(axis=2, dtype=np.uint64)
    return keys, (sig & 0xFF).astype(np.uint8)


def _densify(sig: np.ndarray) -> None:
    """Fill empty bins (in place) from the next non-empty bin to the right, cyclically.

    The filled value depends on the source value and the distance, so two texts get
    equal values in a bin exactly when their sources agree at the same distance.
    Works on the flattened (n * K) array: every row has at least one non-empty bin.
    """
    n, K = sig.shape
    flat = sig.reshape(-1)
    empty = flat == _MAX32
    if not empty.any():
        return
    pos = np.arange(flat.size, dtype=np.int64)
    big = np.int64(flat.size + K)
    nxt = np.where(empty, big, pos)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]  # next non-empty position, maybe in a later row
    where = np.flatnonzero(empty)
    row_end = (where // K + 1) * K
    src = nxt[where]
    wrapped = src >= row_end
    # past the row's end: wrap to the row's first non-empty bin
    src[wrapped] = nxt[row_end[wrapped] - K]
    dist = np.where(wrapped, src + K - where, src - where).astype(np.uint64)
    filled = flat[src].astype(np.uint64) + dist * _ROT
    flat[where] = (_mix(filled) & _U64(0xFFFFFFFE)).astype(np.uint32)  # never the empty marker


def _signatures(arr: pa.Array, p: Params) -> tuple[np.ndarray, np.ndarray]:
    offsets, data = _buffers(arr)
    n = len(arr)
    bounds = list(range(0, n, p.chunk_docs)) + [n]
    jobs = [(offsets[a: b + 1]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def run(boff):
        return _signature_chunk(data, boff, p)

    if p.workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(p.workers) as pool:
            parts = list(pool.map(run, jobs))
    else:
        parts = [run(j) for j in jobs]
    if not parts:
        return np.zeros((0, p.bands), np.uint64), np.zeros((0, p.num_perm), np.uint8)
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


# ---------------------------------------------------------------- candidates

def _band_pairs(keys: np.ndarray, band: int, p: Params) -> np.ndarray:
    """Candidate pairs (m, 2) int64 from one band's buckets; linear in the size of a huge bucket."""
    n = keys.shape[0]
    col = keys[:, band]
    order = np.argsort(col, kind="stable")
    sk = col[order]
    breaks = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    starts = np.concatenate(([0], breaks))
    sizes = np.diff(np.concatenate((starts, [n])))
    out = []
    small = (sizes >= 2) & (sizes <= p.max_bucket_pairs)
    for m in np.unique(sizes[small]):
        first = starts[sizes == m]
        iu, ju = np.triu_indices(int(m), 1)
        out.append(np.stack((order[first[:, None] + iu].ravel(), order[first[:, None] + ju].ravel()), axis=1))
    big = np.flatnonzero(sizes > p.max_bucket_pairs)
    if big.size:
        run_of = np.repeat(np.arange(big.size), sizes[big])
        idx = np.arange(run_of.size) + np.repeat(starts[big] - (np.cumsum(sizes[big]) - sizes[big]), sizes[big])
        members = order[idx]
        pivots = members[np.repeat(np.cumsum(sizes[big]) - sizes[big], sizes[big])]
        star = members != pivots
        out.append(np.stack((pivots[star], members[star]), axis=1))
        # neighbours in an order by the next bands' keys: members that also share other
        # bands (the likely near duplicates) end up next to each other
        nb = keys.shape[1]
        sort_keys = [keys[members, (band + j) % nb] for j in range(min(3, nb - 1), 0, -1)]
        o = np.lexsort(tuple(sort_keys) + (run_of,))
        ms, rs = members[o], run_of[o]
        for d in range(1, p.bucket_window + 1):
            same = rs[d:] == rs[:-d]
            out.append(np.stack((ms[:-d][same], ms[d:][same]), axis=1))
    if not out:
        return np.zeros((0, 2), np.int64)
    return np.concatenate(out).astype(np.int64)


def _candidates(keys: np.ndarray, sig8: np.ndarray, p: Params) -> np.ndarray:
    """Unique candidate pairs (i < j) that pass the signature prefilter."""
    codes = []
    for b in range(keys.shape[1]):
        pairs = _band_pairs(keys, b, p)
        lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
        codes.append(np.unique((lo.astype(np.uint64) << _U64(32)) | hi.astype(np.uint64)))
    code = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.uint64)
    pairs = np.stack(((code >> _U64(32)).astype(np.int64), (code & _U64(0xFFFFFFFF)).astype(np.int64)), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if not pairs.size:
        return pairs
    need = int(np.ceil(max(p.threshold - p.prefilter_margin, 0.0) * sig8.shape[1]))
    keep = np.zeros(len(pairs), bool)
    step = 1 << 16
    for a in range(0, len(pairs), step):
        chunk = pairs[a: a + step]
        agree = np.count_nonzero(sig8[chunk[:, 0]] == sig8[chunk[:, 1]], axis=1)
        keep[a: a + step] = agree >= need
    return pairs[keep]


# ---------------------------------------------------------------- exact verification

def _exact_jaccard_pairs(arr: pa.Array, pairs: np.ndarray, k: int, batch_pairs: int = 1 << 15) -> np.ndarray:
    """Exact shingle Jaccard for each pair (vectorized, in batches of pairs)."""
    out = np.empty(len(pairs), np.float64)
    for a in range(0, len(pairs), batch_pairs):
        out[a: a + batch_pairs] = _exact_batch(arr, pairs[a: a + batch_pairs], k)
    return out


def _exact_batch(arr: pa.Array, pairs: np.ndarray, k: int) -> np.ndarray:
    docs, local = np.unique(pairs.ravel(), return_inverse=True)
    local = local.reshape(pairs.shape)
    sub = arr.take(pa.array(docs, pa.int64()))
    boff, data = _buffers(sub)
    cp, coff = _codepoints(data[boff[0]: boff[-1]], boff - boff[0])
    v = cp.astype(np.uint64) + _U64(1)
    bits = max(int(v.max()).bit_length() if v.size else 1, 1)
    rank_bits = max(int(len(docs)).bit_length(), 1)
    if k * bits > 64:  # shingles cannot be packed exactly into 64 bits: compare sets in Python
        texts = sub.to_pylist()
        return np.array([jaccard(texts[i], texts[j], k) for i, j in local])
    # exact packing: shingle = its k code points (+1, so a short text's zero padding is distinct)
    counts, starts, short = _windows(coff, k)
    total_chars = v.size
    ends = np.repeat(coff[1:], counts)
    ids = np.zeros(starts.size, np.uint64)
    for j in range(k):
        at = starts + j
        present = at < ends
        ids <<= _U64(bits)
        ids[present] |= v[at[present]]
    del total_chars
    doc_of = np.repeat(np.arange(len(docs), dtype=np.uint64), counts)
    if k * bits + rank_bits <= 64:
        comp = (doc_of << _U64(k * bits)) | ids
        shift = k * bits
    else:  # re-number the distinct shingles densely so that (doc, shingle) fits in 64 bits
        _, dense = np.unique(ids, return_inverse=True)
        shift = max(int(dense.max()).bit_length(), 1)
        comp = (doc_of << _U64(shift)) | dense.astype(np.uint64)
    uniq = np.unique(comp)  # sorted by doc, then shingle; each doc's set once
    doc_u = (uniq >> _U64(shift)).astype(np.int64)
    size = np.bincount(doc_u, minlength=len(docs))
    begin = np.concatenate(([0], np.cumsum(size)[:-1]))
    # look up the members of the smaller set in the other set
    a, b = local[:, 0], local[:, 1]
    swap = size[a] > size[b]
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    qn = size[a]
    pair_of = np.repeat(np.arange(len(pairs)), qn)
    elem = np.arange(qn.sum()) + np.repeat(begin[a] - (np.cumsum(qn) - qn), qn)
    mask = _U64((1 << shift) - 1) if shift < 64 else _U64(0xFFFFFFFFFFFFFFFF)
    query = (b[pair_of].astype(np.uint64) << _U64(shift)) | (uniq[elem] & mask)
    at = np.minimum(np.searchsorted(uniq, query), uniq.size - 1)
    inter = np.bincount(pair_of, weights=(uniq[at] == query), minlength=len(pairs))
    return inter / (size[a] + size[b] - inter)


# ---------------------------------------------------------------- clusters

def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Smallest index of each node's connected component (min-label propagation + pointer jumping)."""
    root = np.arange(n, dtype=np.int64)
    if not len(edges):
        return root
    u, v = edges[:, 0], edges[:, 1]
    while True:
        low = np.minimum(root[u], root[v])
        before = root.copy()
        np.minimum.at(root, root[u], low)
        np.minimum.at(root, root[v], low)
        np.minimum.at(root, u, low)
        np.minimum.at(root, v, low)
        while True:  # pointer jumping: every node points at its root's root
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped
        if np.array_equal(root, before):
            return root


@dataclass
class NearDuplicates:
    roots: np.ndarray  # per text: smallest index of its cluster
    pairs: np.ndarray  # (m, 2) verified pairs i < j
    similarity: np.ndarray  # (m,) their exact Jaccard
    candidates: int  # pairs verified exactly (after the prefilter)


def find_near_duplicates(texts, **params) -> NearDuplicates:
    """The whole detector; `near_duplicate_clusters` and `cross_group_near_duplicates` wrap it."""
    p = Params(**params)
    arr = _as_string_array(texts)
    n = len(arr)
    if n == 0:
        return NearDuplicates(np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0), 0)
    keys, sig8 = _signatures(arr, p)
    cand = _candidates(keys, sig8, p)
    sim = _exact_jaccard_pairs(arr, cand, p.shingle_size) if len(cand) else np.zeros(0)
    ok = sim >= p.threshold - 1e-12
    pairs, sim = cand[ok], sim[ok]
    return NearDuplicates(_components(n, pairs), pairs, sim, int(len(cand)))


def near_duplicate_clusters(texts, *, threshold: float = 0.8, shingle_size: int = 3, num_perm: int = 128,
                            bands: int = 16, workers: int = 2, **tuning) -> np.ndarray:
    """For each text, the index of its near-duplicate cluster's root (the cluster's smallest index).

    `texts`: a pyarrow string array or a list of str, normalized, no nulls.
    """
    return find_near_duplicates(texts, threshold=threshold, shingle_size=shingle_size, num_perm=num_perm,
                                bands=bands, workers=workers, **tuning).roots


def cross_group_near_duplicates(texts, groups: Sequence, *, threshold: float = 0.8, shingle_size: int = 3,
                                num_perm: int = 128, bands: int = 16, workers: int = 2,
                                **tuning) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs (i, j, jaccard) whose members are in different groups.

    Used by the split leakage check (groups = split names). A cluster spans two groups
    exactly when one of its verified pairs does, so an empty list proves no cluster does.
    Texts need not be distinct here: identical texts are a pair with Jaccard 1.
    """
    if len(groups) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(groups)} groups")
    found = find_near_duplicates(texts, threshold=threshold, shingle_size=shingle_size, num_perm=num_perm,
                                 bands=bands, workers=workers, **tuning)
    _, group_ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    pairs, sim = found.pairs, found.similarity
    cross = group_ids[pairs[:, 0]] != group_ids[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
    return [(int(i), int(j), float(s)) for (i, j), s in zip(pairs[cross], sim[cross])]
