"""Near-duplicate detection: MinHash LSH over character shingles, every merge verified exactly.

Texts arrive already normalized and distinct (curation removes exact duplicates
first). Two texts are near duplicates when the Jaccard similarity of their sets of
character n-grams ("shingles"; a text shorter than n is one shingle) is at least the
threshold. Clusters are the connected components of the verified pairs: a chain
a~b~c puts a and c together even when J(a, c) is below the threshold. Optionally
(`keepers=True`, `linkage="keeper"`) each chain cluster is also split so that every
member is a verified near duplicate of its keeper.

Everything is numpy over the Arrow string buffers, never a Python loop per text, and the
heavy steps (signatures, the candidate filter and estimates, verification batches) are
spread over `workers` threads, this one included (numpy releases the GIL):
  1. Signatures, chunk by chunk: UTF-8 bytes (ASCII as they are) -> code points -> one
     64-bit hash per shingle, computed where each window lies -> two independent
     one-permutation MinHash sketches of `num_perm` bins (the hash picks the bin and a
     value; each bin keeps its minimum), empty bins filled by rotation densification.
     Kept per text: `bands` 64-bit band keys (from the first sketch) and 4 bits of each
     slot of both sketches (b-bit MinHash): 128 + 128 bytes at the defaults. Shingle
     lists are never kept.
  2. Candidates: texts sharing a band key. Each bucket gives its members paired with
     its first member ("star"); small buckets also give all their other pairs, a huge
     bucket (templated boilerplate) only each member's neighbours in an order by the
     following bands' keys, so the work stays linear in the bucket size.
  3. Union as we go: a candidate whose texts are already in one cluster is skipped; the
     others are estimated from the 4-bit sketches, those far below the threshold (more
     than `prefilter_sigmas` standard deviations of the estimate) are dropped, and the
     rest are verified most similar first, one pair per pair of clusters at a time, so a
     success makes the other pairs between those clusters redundant. Which pairs get
     verified depends on the order; the clusters do not (a skipped pair already lies
     inside one cluster).
  4. Verification: exact Jaccard of the shingle sets, recomputed for just the texts of
     a batch of pairs, pairs sharing a text batched together (shingles packed exactly from
     the batch's alphabet, or the texts' own when they are ASCII, numbered by a lookup
     table, sets as bitsets: |A & B| is a popcount).
  5. Clusters: connected components of the verified pairs; each text maps to the
     smallest index of its cluster.
"""

from __future__ import annotations

import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_U64 = np.uint64
_EMPTY = np.uint32(0xFFFFFFFF)
# Fixed odd 64-bit constants: the same text always gets the same signature.
_POLY = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xFF51AFD7ED558CCD)
_M2 = _U64(0xC4CEB9FE1A85EC53)
_SEED = _U64(0xD6E8FEB86659FD93)
_ROT = _U64(0xA0761D6478BD642F)
_BAND_MULT = np.random.default_rng(20261123).integers(1, 1 << 63, 4096, dtype=np.uint64) | _U64(1)
_SKETCHES, _SKETCH_BITS = 2, 4


@dataclass(frozen=True)
class Params:
    threshold: float = 0.8
    shingle_size: int = 3
    num_perm: int = 128
    bands: int = 16
    workers: int = 2
    # Texts per signature chunk (small enough that a chunk's arrays stay in cache).
    chunk_docs: int = 4096
    # A bucket up to this size gives all its pairs; a larger one stars and neighbours only.
    max_bucket_pairs: int = 64
    # In a huge bucket, each member is paired with this many neighbours.
    bucket_window: int = 3
    # Drop candidates whose estimated Jaccard is this many standard deviations below the
    # threshold; None verifies every candidate.
    prefilter_sigmas: float | None = 2.0
    # Candidate pairs held back at most (bounded memory: 8 bytes each).
    max_pending: int = 1 << 23
    # Pairs verified per batch (bounded memory for the verification).
    verify_batch: int = 2048

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if not 1 <= self.shingle_size <= 16:
            raise ValueError(f"shingle_size={self.shingle_size} must be between 1 and 16")
        if not 1 <= self.num_perm <= 4096:
            raise ValueError(f"num_perm={self.num_perm} must be between 1 and 4096")
        if self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"bands={self.bands} must divide num_perm={self.num_perm}")
        if min(self.workers, self.chunk_docs, self.verify_batch, self.max_pending) < 1:
            raise ValueError("workers, chunk_docs, verify_batch and max_pending must be at least 1")

    def agreement_at(self, similarity: float, sigmas: float = 0.0) -> int:
        """Matching 4-bit slots (of 2 * num_perm) expected at `similarity`, less `sigmas` deviations."""
        chance = 1 / 2 ** _SKETCH_BITS  # slots of unrelated texts match by chance in their kept bits
        slots = _SKETCHES * self.num_perm
        p = chance + (1 - chance) * similarity
        return max(0, math.floor((p - sigmas * math.sqrt(p * (1 - p) / slots)) * slots))

    def min_agreement(self) -> int:
        """Candidates matching on fewer slots are not verified."""
        return 0 if self.prefilter_sigmas is None else self.agreement_at(self.threshold, self.prefilter_sigmas)


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


def _mix(h: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (in place): spreads every input bit over the output."""
    h ^= h >> _U64(33)
    h *= _M1
    h ^= h >> _U64(33)
    h *= _M2
    h ^= h >> _U64(33)
    return h


# ---------------------------------------------------------------- signatures

def _poly_step(acc: np.ndarray, char: np.ndarray) -> np.ndarray:
    acc *= _POLY
    acc += char
    return acc


def _mix_into(h: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """`_mix` in place with a scratch array of h's size (no temporaries)."""
    for mult in (_M1, _M2, None):
        np.right_shift(h, _U64(33), out=tmp)
        h ^= tmp
        if mult is not None:
            h *= mult
    return h


_SIG_BLOCK = 1 << 15  # windows hashed at a time
# POLY^j, and sum_{j<k} POLY^j (mod 2^64): a window's hash is sum_j (char_j + 1) * POLY^(k-1-j), the
# fold acc * POLY + (char + 1) unrolled, with the +1s added once as that sum
_POW = [1]
for _ in range(16):
    _POW.append(_POW[-1] * int(_POLY) % (1 << 64))
_ONES = [_U64(sum(_POW[:k]) % (1 << 64)) for k in range(17)]
_POW = [_U64(x) for x in _POW]


def _chunk_chars(arr: pa.Array, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Chars of texts [start, stop) and their char offsets: ASCII as the UTF-8 bytes themselves (no copy)."""
    _, off_buf, data_buf = arr.buffers()
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    boff = np.frombuffer(off_buf, dtype=width, count=stop - start + 1,
                         offset=(arr.offset + start) * np.dtype(width).itemsize).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    raw = data[boff[0]: boff[-1]]
    boff -= boff[0]
    if raw.size == 0 or int(raw.max()) < 0x80:
        return raw, boff
    return _codepoints(raw, boff)


def _not_shingles(coff: np.ndarray, lengths: np.ndarray, k: int, w: int) -> np.ndarray:
    """Window starts (< w) that are not a shingle of their text: the last k-1 of a long text, all of a short one."""
    short = lengths < k
    ends = coff[1:][~short]
    parts = [ends - j for j in range(1, k)]
    sidx = np.flatnonzero(short)
    if sidx.size:
        parts += [coff[sidx[lengths[sidx] > j]] + j for j in range(k - 1)]
    pos = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return pos[pos < w]


def _short_values(chars: np.ndarray, coff: np.ndarray, idx: np.ndarray, k: int, step, first, dtype) -> np.ndarray:
    """The one shingle of each short text idx: its chars folded by `step`, then step(acc, 0) per missing one."""
    lengths = coff[idx + 1] - coff[idx]
    acc = None
    for j in range(k):
        has = lengths > j
        char = np.zeros(idx.size, dtype)
        char[has] = first(chars[coff[idx[has]] + j])
        acc = char if acc is None else step(acc, char)
    return acc


def _signature_chunk(arr: pa.Array, start: int, stop: int, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Band keys (n, bands) uint64 and packed 4-bit sketches (n, num_perm) uint8 for texts [start, stop).

    Every window of k chars is hashed where it lies (one pass per char of the window, no shingle
    array compacted out of them); windows that are not a shingle of their text feed a trash row.
    """
    n, K, k = stop - start, p.num_perm, p.shingle_size
    chars, coff = _chunk_chars(arr, start, stop)
    lengths = np.diff(coff)
    w = max(chars.size - k + 1, 0)
    row = _SKETCHES * K
    index = np.int32 if (n + 1) * row < 2 ** 31 else np.int64
    base = np.repeat(np.arange(0, n * row, row, dtype=index), lengths)[:w]
    base[_not_shingles(coff, lengths, k, w)] = n * row  # the trash row
    sig = np.full((n + 1) * row, _EMPTY, np.uint32)
    low = 0 if sys.byteorder == "little" else 1  # the uint32 half holding the hash's low bits
    step = min(w, _SIG_BLOCK)
    h, tmp = np.empty(step, np.uint64), np.empty(step, np.uint64)
    for a in range(0, w, _SIG_BLOCK):  # a block of windows at a time: its arrays stay in cache
        b = min(a + _SIG_BLOCK, w)
        hb, tb = h[: b - a], tmp[: b - a]
        np.multiply(chars[a: b], _POW[k - 1], out=hb, dtype=np.uint64)
        for j in range(1, k - 1):
            np.multiply(chars[a + j: b + j], _POW[k - 1 - j], out=tb, dtype=np.uint64)
            hb += tb
        if k > 1:
            np.add(hb, chars[a + k - 1: b + k - 1], out=hb, dtype=np.uint64)
        hb += _ONES[k]
        hb ^= _SEED
        _mix_into(hb, tb)
        # two sketches from the two 32-bit halves of the hash: 16 bits pick the bin, 16 the value
        halves = hb.view(np.uint32).reshape(b - a, 2)
        slot = tb.view(np.uint32).reshape(b - a, 2)
        if K > 1 and K & (K - 1) == 0:  # (x >> 16) * K >> 16 is a shift
            np.right_shift(halves, np.uint32(33 - K.bit_length()), out=slot)
        else:
            np.right_shift(halves, np.uint32(16), out=slot)
            slot *= np.uint32(K)
            slot >>= np.uint32(16)
        slot = slot.view(np.int32) if index is np.int32 else slot.astype(index)
        slot[:, low] += K
        slot += base[a: b, None]
        halves &= np.uint32(0xFFFF)
        np.minimum.at(sig, slot.reshape(-1), halves.reshape(-1))
    del base, h, tmp
    short = np.flatnonzero(lengths < k)
    if short.size:  # a text shorter than k is one shingle
        sh = _short_values(chars, coff, short, k, _poly_step, lambda c: c.astype(np.uint64) + _U64(1), np.uint64)
        sh = _mix(sh ^ _SEED)
        for s, half in enumerate(((sh >> _U64(32)).astype(np.uint32), sh.astype(np.uint32))):
            at = (((half >> np.uint32(16)) * np.uint32(K)) >> np.uint32(16)).astype(index)
            at += (short * row + s * K).astype(index)
            np.minimum.at(sig, at, half & np.uint32(0xFFFF))
    sig = sig[: n * row].reshape(n * _SKETCHES, K)
    _densify(sig)
    sig = sig.reshape(n, _SKETCHES, K)

    # band b takes slots b, b + bands, ... of the first sketch: interleaved, so a band is not
    # made of neighbouring bins filled from one source by densification. The key is a
    # multilinear hash of the band's values (a rare collision only adds a candidate).
    rows = K // p.bands
    banded = sig[:, 0, :].reshape(n, rows, p.bands).astype(np.uint64)
    banded *= _BAND_MULT[:rows, None]
    keys = banded.sum(axis=1, dtype=np.uint64)
    packed = np.zeros((n, -(-K // 8) * 8), np.uint8)  # padded to whole 8-byte words
    packed[:, :K] = (sig[:, 0, :] & 15) << 4 | (sig[:, 1, :] & 15)
    return keys, packed


def _densify(sig: np.ndarray) -> None:
    """Fill empty bins (in place) from the next non-empty bin to the right, cyclically.

    The filled value depends on the source value and the distance, so two texts get
    equal values in a bin exactly when their sources agree at the same distance.
    Every row has at least one non-empty bin. (In the last row, the empty bins after its
    last non-empty one take that bin, to their left, as the source: as this has always
    done, so that stored signatures stay comparable.)
    """
    R, K = sig.shape
    flat = sig.reshape(-1)
    full = flat != _EMPTY
    where = np.flatnonzero(~full)
    if not where.size:
        return
    nonempty = np.flatnonzero(full)
    it = np.int32 if flat.size < 2 ** 31 else np.int64
    where = where.astype(it)
    # non-empty bins before the i-th empty one: where[i] - i; the next one is the first after it
    ahead = where - np.arange(where.size, dtype=it)
    np.minimum(ahead, it(nonempty.size - 1), out=ahead)  # past the last one: the last one
    nxt = np.take(nonempty, ahead).astype(it)
    dist = nxt - where
    col = where & it(K - 1) if K & (K - 1) == 0 else where % it(K)
    wrapped = np.flatnonzero(dist > (K - 1) - col)  # none after it in its row: the row's first non-empty bin
    if wrapped.size:
        row0 = where[wrapped] - col[wrapped]
        first = np.argmax(full.reshape(R, K), axis=1).astype(it)[row0 // K]
        nxt[wrapped] = row0 + first
        dist[wrapped] = first + K - col[wrapped]
    dist[dist < 0] += K
    step = min(where.size, _SIG_BLOCK)
    h, tmp = np.empty(step, np.uint64), np.empty(step, np.uint64)
    for a in range(0, where.size, _SIG_BLOCK):  # in cache-sized blocks
        b = min(a + _SIG_BLOCK, where.size)
        hb, tb = h[: b - a], tmp[: b - a]
        hb[:] = flat[nxt[a: b]]
        tb[:] = dist[a: b]
        tb *= _ROT
        hb += tb
        _mix_into(hb, tb)
        hb &= _U64(0xFFFFFFFE)  # never the empty marker
        flat[where[a: b]] = hb


def _signatures(arr: pa.Array, p: Params) -> tuple[np.ndarray, np.ndarray]:
    n = len(arr)
    spans = [(a, min(a + p.chunk_docs, n)) for a in range(0, n, p.chunk_docs)]
    if not spans:
        return np.zeros((0, p.bands), np.uint64), np.zeros((0, -(-p.num_perm // 8) * 8), np.uint8)
    with _Pool(p.workers) as pool:
        parts = pool.map(lambda span: _signature_chunk(arr, *span, p), spans)
    return np.concatenate([k for k, _ in parts]), np.concatenate([s for _, s in parts])


class _Pool:
    """`workers` threads in all: this one and workers - 1 others (numpy releases the GIL); map keeps the order."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = ThreadPoolExecutor(workers - 1) if workers > 1 else None

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown()

    def map(self, fn, items) -> list:
        items = list(items)
        if self.executor is None or len(items) < 2:
            return [fn(x) for x in items]
        out = [None] * len(items)
        todo = iter(range(len(items)))
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                out[i] = fn(items[i])

        helpers = [self.executor.submit(drain) for _ in range(min(self.workers - 1, len(items) - 1))]
        try:
            drain()
        finally:
            for f in helpers:
                f.result()
        return out


# ---------------------------------------------------------------- candidates

def _band_pairs(keys: np.ndarray, band: int, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of one band, as (star, rest), each (m, 2) int64."""
    star, rest = _band_candidates(keys, band, p)
    return star.astype(np.int64), rest.astype(np.int64)


def _band_candidates(keys: np.ndarray, band: int, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """_band_pairs with int32 indices where they fit (half the memory traffic downstream)."""
    n = keys.shape[0]
    col = keys[:, band]
    order = _stable_argsort(col)
    if n < 2 ** 31:
        order = order.astype(np.int32)
    sk = col[order]
    starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
    sizes = np.diff(np.append(starts, n))
    multi = sizes >= 2
    first = np.repeat(starts[multi], sizes[multi])
    at = np.arange(first.size) + first - np.repeat(np.cumsum(sizes[multi]) - sizes[multi], sizes[multi])
    star = np.stack((order[first], order[at]), axis=1)[at != first]
    rest = []
    small = multi & (sizes <= p.max_bucket_pairs)
    for m in np.unique(sizes[small]):
        if m < 3:
            continue
        iu, ju = np.triu_indices(int(m), 1)
        keep = iu > 0  # the pairs with the first member are stars
        base = starts[sizes == m][:, None]
        rest.append(np.stack((order[base + iu[keep]].ravel(), order[base + ju[keep]].ravel()), axis=1))
    big = np.flatnonzero(sizes > p.max_bucket_pairs)
    if big.size and p.bucket_window:
        runs = np.repeat(np.arange(big.size), sizes[big])
        idx = np.arange(runs.size) + np.repeat(starts[big] - (np.cumsum(sizes[big]) - sizes[big]), sizes[big])
        members = order[idx]
        # members that share the next bands too (the likely near duplicates) end up adjacent
        nb = keys.shape[1]
        following = tuple(keys[members, (band + j) % nb] for j in range(min(3, nb - 1), 0, -1))
        o = np.lexsort(following + (runs,))
        ms, rs = members[o], runs[o]
        for d in range(1, p.bucket_window + 1):
            same = rs[d:] == rs[:-d]
            rest.append(np.stack((ms[:-d][same], ms[d:][same]), axis=1))
    rest = np.concatenate(rest) if rest else np.zeros((0, 2), order.dtype)
    return star, rest


def _stable_argsort(col: np.ndarray) -> np.ndarray:
    """np.argsort(col, kind="stable") for uint64 keys: an unstable sort (several times faster), then
    each run of equal keys put back in index order."""
    if col.size >= 2 ** 32:
        return np.argsort(col, kind="stable")
    order = np.argsort(col)
    if col.size < 2:
        return order
    sk = col[order]
    run = np.cumsum(np.concatenate(([False], sk[1:] != sk[:-1])), dtype=np.uint64)
    run <<= _U64(32)
    run |= order.astype(np.uint64)
    run.sort()
    return (run & _U64(0xFFFFFFFF)).astype(np.int64)


def _each_band(keys: np.ndarray, p: Params):
    """_band_candidates of every band in order, the next ones computed ahead on worker threads."""
    if p.workers == 1:
        yield from (_band_candidates(keys, b, p) for b in range(p.bands))
        return
    with ThreadPoolExecutor(p.workers - 1) as pool:
        ahead = [pool.submit(_band_candidates, keys, b, p) for b in range(min(p.workers, p.bands))]
        for b in range(p.bands):
            result = ahead.pop(0).result()
            if b + len(ahead) + 1 < p.bands:
                ahead.append(pool.submit(_band_candidates, keys, b + len(ahead) + 1, p))
            yield result


# pairs per span of the candidate filter (spread over the workers) and of the agreement count (in cache)
_CANDIDATE_SPAN, _AGREE_SPAN = 1 << 16, 1 << 12
_NIBBLE_LOW = _U64(0x1111111111111111)
_BYTE_LANES = _U64(0x00FF00FF00FF00FF)
_LANE_SUM = _U64(0x0001000100010001)


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[index]: np.take with intp indices, faster than indexing."""
    return np.take(values, index.astype(np.intp, copy=False))


def _rows(pairs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """pairs[mask] for (m, 2) pairs; int32 pairs selected as one int64 each (numpy's 1-d path, twice as fast)."""
    if pairs.dtype == np.int32 and pairs.flags.c_contiguous:
        return pairs.view(np.int64).reshape(-1)[mask].view(np.int32).reshape(-1, 2)
    return pairs[mask]


class _Clusters:
    """Union of verified pairs, grown batch by batch; pairs already inside one cluster are skipped."""

    def __init__(self, arr: pa.Array, sketch: np.ndarray, p: Params, pool: _Pool | None = None):
        self.arr, self.sketch, self.p = arr, sketch, p
        self.pool = pool if pool is not None else _Pool(1)
        self.words = sketch.view(np.uint64)
        self.alphabet = _ascii_alphabet(arr, p.shingle_size)
        self.root = np.arange(len(arr), dtype=np.int64)
        self.need = p.min_agreement()
        self.edges: list[np.ndarray] = []
        self.sims: list[np.ndarray] = []
        self.failed: list[np.ndarray] = []  # verified pairs below the threshold
        self.verified = 0

    def _spans(self, m: int) -> list[tuple[int, int]]:
        """[a, b) spans of m pairs: equal, at most _CANDIDATE_SPAN, one per worker when there are enough."""
        count = max(-(-m // _CANDIDATE_SPAN), min(self.pool.workers, -(-m // _AGREE_SPAN)), 1)
        bounds = [m * i // count for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def agreement(self, pairs: np.ndarray) -> np.ndarray:
        """Matching 4-bit slots of each pair (XOR the packed sketches 8 bytes at a time, count zero nibbles)."""
        out = np.empty(len(pairs), np.int64)
        spans = self._spans(len(pairs))
        self.pool.map(lambda s: self._agree(pairs[s[0]: s[1]], out[s[0]: s[1]]), spans)
        return out

    def _agree(self, pairs: np.ndarray, out: np.ndarray) -> None:
        words, slots = self.words, _SKETCHES * self.p.num_perm  # padding bytes always match: not counted
        span = min(len(pairs), _AGREE_SPAN)
        # this thread's buffers: rows gathered by np.take into them (twice as fast as fancy indexing,
        # and no fresh memory per span)
        x_buf, y_buf = np.empty((span, words.shape[1]), np.uint64), np.empty((span, words.shape[1]), np.uint64)
        for a in range(0, len(pairs), _AGREE_SPAN):
            c = pairs[a: a + _AGREE_SPAN]
            x, y = x_buf[: len(c)], y_buf[: len(c)]
            np.take(words, c[:, 0].astype(np.intp), axis=0, out=x, mode="clip")  # (indices are valid)
            np.take(words, c[:, 1].astype(np.intp), axis=0, out=y, mode="clip")
            x ^= y
            np.right_shift(x, _U64(1), out=y)
            x |= y
            np.right_shift(x, _U64(2), out=y)
            x |= y
            x &= _NIBBLE_LOW  # one bit per nonzero nibble
            counts = np.bitwise_count(x)  # per word, at most 16
            if counts.shape[1] == 16:  # two words of byte counts, summed in 16-bit lanes
                s = counts.view(np.uint64)
                s = s[:, 0] + s[:, 1]
                s = (s & _BYTE_LANES) + ((s >> _U64(8)) & _BYTE_LANES)
                differ = (s * _LANE_SUM) >> _U64(48)
            else:
                differ = counts.sum(axis=1, dtype=np.int64)
            np.subtract(slots, differ, out=out[a: a + _AGREE_SPAN], casting="unsafe")

    def candidates(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pairs not yet in one cluster that pass the prefilter, with their agreement."""
        root = self.root

        def span(s: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            c = pairs[s[0]: s[1]]
            c = _rows(c, _take(root, c[:, 0]) != _take(root, c[:, 1]))
            agree = np.empty(len(c), np.int64)
            self._agree(c, agree)
            keep = agree >= self.need
            return _rows(c, keep), agree[keep]

        spans = self._spans(len(pairs))
        parts = self.pool.map(span, spans)
        if not parts:
            return pairs[:0], np.zeros(0, np.int64)
        return np.concatenate([c for c, _ in parts]), np.concatenate([a for _, a in parts])

    def add(self, pairs: np.ndarray, agree: np.ndarray) -> None:
        """Verify `pairs`, most similar first, a window at a time; merge the clusters of those that pass.

        Before each window, pairs whose texts are by now in one cluster are dropped; inside a
        window only the first pair between two clusters is verified, the others wait for the
        next window (redundant if that one passed).
        """
        # most similar first, ties in queue order (a stable sort of small keys: a radix sort)
        pairs = pairs[np.argsort((_SKETCHES * self.p.num_perm - agree).astype(np.uint16), kind="stable")]
        window = self.p.verify_batch * self.p.workers * 4
        # The queue is `carry` then pairs[pos:]. Only the next window is filtered and copied each round
        # (filtering and copying the whole queue every round made this quadratic in the number of pairs);
        # a pair's fate is decided when it reaches the head, against the clusters as they are then.
        carry, pos = pairs[:0], 0
        while True:
            parts = [_rows(carry, _take(self.root, carry[:, 0]) != _take(self.root, carry[:, 1]))]
            have = len(parts[0])
            while have < window and pos < len(pairs):
                chunk = pairs[pos: pos + window]
                pos += len(chunk)
                chunk = _rows(chunk, _take(self.root, chunk[:, 0]) != _take(self.root, chunk[:, 1]))
                parts.append(chunk)
                have += len(chunk)
            queued = np.concatenate(parts)
            if not len(queued):
                break
            head, overflow = queued[:window], queued[window:]
            ra, rb = _take(self.root, head[:, 0]), _take(self.root, head[:, 1])
            chosen = np.zeros(len(head), bool)
            chosen[_first_of_each(np.minimum(ra, rb), np.maximum(ra, rb))] = True
            batch = _rows(head, chosen)
            sim = _exact_pairs(self.arr, batch, self.p.shingle_size, self.pool, self.p.verify_batch, self.alphabet)
            self.verified += len(batch)
            ok = sim >= self.p.threshold - 1e-12
            self.failed.append(_rows(batch, ~ok))
            if ok.any():
                self.edges.append(_rows(batch, ok))
                self.sims.append(sim[ok])
                self.root = _components(self.root, self.edges[-1])
            carry = np.concatenate((_rows(head, ~chosen), overflow))


# ---------------------------------------------------------------- exact verification

_scratch = threading.local()
# pairs per verification batch at most (beyond, the bitsets outgrow the cache); a call's pairs are
# split over the workers down to batches of _MIN_SPAN
_SPAN_PAIRS, _MIN_SPAN = 1024, 64


def _or_step(bits: int):
    def step(acc: np.ndarray, char: np.ndarray) -> np.ndarray:
        acc <<= acc.dtype.type(bits)
        acc |= char
        return acc
    return step


def exact_jaccard_pairs(texts, pairs: np.ndarray, shingle_size: int = 3, *, workers: int = 1,
                        batch_pairs: int = 2048) -> np.ndarray:
    """Exact shingle Jaccard of each pair (i, j) of `texts` (vectorized, in batches)."""
    arr = _as_string_array(texts)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    with _Pool(workers) as pool:
        return _exact_pairs(arr, pairs, shingle_size, pool, batch_pairs)


def _exact_pairs(arr: pa.Array, pairs: np.ndarray, k: int, pool: _Pool, batch_pairs: int,
                 alphabet: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """exact_jaccard_pairs on `pool`: pairs sharing a text batched together (its shingles are computed
    once), batches of at most batch_pairs and _SPAN_PAIRS (a batch's bitsets stay in cache), at least
    one per worker when there are enough."""
    m = len(pairs)
    if not m:
        return np.zeros(0)
    order = np.argsort(np.minimum(pairs[:, 0], pairs[:, 1]), kind="stable")
    spans = max(-(-m // min(batch_pairs, _SPAN_PAIRS)), min(pool.workers, m // _MIN_SPAN))
    bounds = [m * i // spans for i in range(spans + 1)]
    pairs = pairs[order]
    parts = pool.map(lambda i: _exact_batch(arr, pairs[bounds[i]: bounds[i + 1]], k, alphabet), range(spans))
    out = np.empty(m)
    out[order] = np.concatenate(parts)
    return out


def _first_of_each(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct (lo, hi) (non-negative integers), in order."""
    m = len(lo)
    if not m:
        return np.zeros(0, np.int64)
    top_hi = int(hi.max()) + 1
    hi_bits, index_bits = top_hi.bit_length(), m.bit_length()
    if (int(lo.max()) + 1).bit_length() + hi_bits + index_bits <= 64:
        # (lo, hi, index) in one word, sorted (a plain sort of integers is the fastest sort numpy has):
        # each run of one (lo, hi) starts with its smallest index
        key = lo.astype(np.uint64)
        key <<= _U64(hi_bits)
        key |= hi.astype(np.uint64)
        key <<= _U64(index_bits)
        key |= np.arange(m, dtype=np.uint64)
        key.sort()
        code = key >> _U64(index_bits)
        first = key[np.concatenate(([True], code[1:] != code[:-1]))] & _U64((1 << index_bits) - 1)
        first.sort()
        return first.astype(np.int64)
    code = (lo.astype(np.uint64) << _U64(32)) | hi.astype(np.uint64)
    order = np.argsort(code)  # not stable (several times faster): the first is the smallest index of its run
    sc = code[order]
    return np.sort(np.minimum.reduceat(order, np.flatnonzero(np.concatenate(([True], sc[1:] != sc[:-1])))))


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if x.size else x


def _ascii_alphabet(arr: pa.Array, k: int) -> tuple[np.ndarray, int] | None:
    """For ASCII texts whose shingles pack into a lookup table's 20 bits: (byte -> 1..a, bits),
    shared by every verification batch of the texts (else each batch numbers its own alphabet)."""
    offsets, data = _buffers(arr)
    chars = data[offsets[0]: offsets[-1]] if len(arr) else data[:0]
    present = np.zeros(256, bool)
    present[pc.unique(pa.array(chars, pa.uint8())).to_numpy()] = True  # (a hash set: numpy counts are slower)
    if present[0x80:].any():
        return None
    lut = np.cumsum(present, dtype=np.uint32)
    bits = max(int(lut[-1]).bit_length(), 1)
    return (lut, bits) if k * bits <= 20 else None


def _exact_batch(arr: pa.Array, pairs: np.ndarray, k: int, alphabet: tuple[np.ndarray, int] | None = None
                 ) -> np.ndarray:
    flat = pairs.ravel()
    docs = _sorted_unique(flat)
    local = np.searchsorted(docs, flat).reshape(pairs.shape)
    sub = arr.take(pa.array(docs, pa.int64()))
    cp, coff = _chunk_chars(sub, 0, len(sub))
    nd = len(docs)
    # renumber the batch's alphabet 1..a (0 pads a short text), so shingles pack into few bits
    if alphabet is not None and cp.dtype == np.uint8:  # the texts' ASCII alphabet
        lut, bits = alphabet
        vt = np.uint32
        v = np.take(lut, cp)
    elif cp.dtype == np.uint8 or (cp.size and int(cp.max()) < (1 << 16)):
        lut = np.cumsum(np.bincount(cp, minlength=1) > 0, dtype=np.uint32)
        bits = max(int(lut[-1]).bit_length(), 1)
        vt = np.uint32 if k * bits <= 32 else np.uint64
        v = np.take(lut.astype(vt), cp)
    else:
        letters = _sorted_unique(cp)
        bits = max(int(letters.size).bit_length(), 1)
        vt = np.uint32 if k * bits <= 32 else np.uint64
        v = (np.searchsorted(letters, cp) + 1).astype(vt)
    if k * bits > 64:  # a shingle does not fit exactly in 64 bits: compare the sets in Python
        texts = sub.to_pylist()
        return np.array([jaccard(texts[i], texts[j], k) for i, j in local])
    # a shingle packed exactly: its k chars side by side, computed for every window where it lies;
    # windows that are not a shingle of their text go to an extra row (as 0, not to widen the vocabulary)
    lengths = np.diff(coff)
    w = max(v.size - k + 1, 0)
    ids = np.left_shift(v[:w], vt(bits * (k - 1)))
    if k > 1:
        tmp = np.empty(w, vt)
        for j in range(1, k - 1):
            np.left_shift(v[j: j + w], vt(bits * (k - 1 - j)), out=tmp)
            ids |= tmp
        ids |= v[k - 1: k - 1 + w]
        del tmp
    owner = np.repeat(np.arange(nd, dtype=np.int64), lengths)[:w]
    wrong = _not_shingles(coff, lengths, k, w)
    ids[wrong] = 0
    owner[wrong] = nd
    short = np.flatnonzero(lengths < k)
    if short.size:  # a text shorter than k is one shingle
        ids = np.concatenate((ids, _short_values(v, coff, short, k, _or_step(bits), lambda c: c, vt)))
        owner = np.concatenate((owner, short))
    # number the batch's distinct shingles 0..V-1
    if k * bits <= 20 and w > (1 << (k * bits)) // 64:  # a lookup table, no sort
        space = 1 << (k * bits)
        ids = ids.astype(np.intp)  # indices as they are used (numpy converts others on each use)
        if getattr(_scratch, "space", 0) < space:
            _scratch.mark, _scratch.table, _scratch.space = np.zeros(space, bool), np.zeros(space, np.int64), space
        mark = _scratch.mark[:space]
        mark[ids] = True
        vocab = np.flatnonzero(mark)
        mark[vocab] = False
        _scratch.table[vocab] = np.arange(vocab.size)
        dense = np.take(_scratch.table, ids)
    else:
        vocab = _sorted_unique(ids)
        dense = np.searchsorted(vocab, ids)
    width = max(-(-int(vocab.size) // 64), 1) * 64
    if nd * width > (1 << 25) and len(pairs) > 1:  # keep the membership matrix small
        half = len(pairs) // 2
        return np.concatenate((_exact_batch(arr, pairs[:half], k, alphabet),
                               _exact_batch(arr, pairs[half:], k, alphabet)))
    # each text's set as a bitset over the vocabulary: |A & B| is a popcount
    owner *= width
    owner += dense
    member = np.zeros((nd + 1) * width, bool)
    member[owner] = True
    words = np.packbits(member.reshape(nd + 1, width)[:nd], axis=1, bitorder="little").view(np.uint64)
    size = np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    a, b = local[:, 0], local[:, 1]
    inter = np.bitwise_count(words[a] & words[b]).sum(axis=1, dtype=np.int64)
    return inter / (size[a] + size[b] - inter)


# ---------------------------------------------------------------- clusters

def _components(root: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Merge `edges` into the forest `root` (root[x] = smallest index of x's cluster, root[root] = root).

    Only the roots the edges touch are merged: hooking roots onto the smaller root and pointer
    jumping on that small graph (pointers only go to smaller indices, so each component ends at
    its smallest root), then every text takes its root's new root.
    """
    ru, rv = _take(root, edges[:, 0]), _take(root, edges[:, 1])
    differ = ru != rv
    if not differ.any():
        return root.copy()
    ends = np.concatenate((ru[differ], rv[differ]))
    if ends.size * 16 > len(root):  # many: the roots involved numbered by a table (no sort)
        mark = np.zeros(len(root), bool)
        mark[ends] = True
        nodes = np.flatnonzero(mark)
        table = np.empty(len(root), np.int64)
        table[nodes] = np.arange(nodes.size)
        local = table[ends]
    else:
        nodes, local = np.unique(ends, return_inverse=True)
    u, v = local[: local.size // 2], local[local.size // 2:]
    label = np.arange(nodes.size)  # local indices follow the roots' order
    while True:
        lu, lv = label[u], label[v]
        differ = lu != lv
        if not differ.any():
            break
        lu, lv = lu[differ], lv[differ]
        low = np.minimum(lu, lv)
        np.minimum.at(label, lu, low)
        np.minimum.at(label, lv, low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
    relabel = np.arange(len(root), dtype=root.dtype)
    relabel[nodes] = nodes[label]
    return relabel[root]


@dataclass
class NearDuplicates:
    roots: np.ndarray  # per text: the smallest index of its (chain) cluster
    pairs: np.ndarray  # (m, 2) verified pairs i < j: a spanning forest of the clusters
    similarity: np.ndarray  # (m,) their exact Jaccard
    verified: int  # pairs whose exact Jaccard was computed
    keepers: np.ndarray | None = None  # with keepers=True: per text, its keeper (see _keeper_split)


def find_near_duplicates(texts, *, keepers: bool = False, **params) -> NearDuplicates:
    """The whole detector; `near_duplicate_clusters` wraps it; the split stage calls it (at higher
    recall) to keep near duplicates among the kept examples in one split.

    keepers=True also gives each text's keeper: see `_keeper_split`.
    """
    p = Params(**params)
    arr = _as_string_array(texts)
    n = len(arr)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return NearDuplicates(empty, np.zeros((0, 2), np.int64), np.zeros(0), 0, empty if keepers else None)
    keys, sketch = _signatures(arr, p)
    with _Pool(p.workers) as pool:
        return _find(arr, keys, sketch, p, pool, keepers)


def _find(arr: pa.Array, keys: np.ndarray, sketch: np.ndarray, p: Params, pool: _Pool, keepers: bool) -> NearDuplicates:
    clusters = _Clusters(arr, sketch, p, pool)
    # Pass 1, band by band: each bucket's star pairs; the likely near duplicates (estimate at
    # least the threshold) are verified at once, which builds the big clusters cheaply.
    # Pass 2: the buckets' other pairs, held back (up to `max_pending`) until the stars have
    # merged what they can, so most of them are skipped as already inside one cluster.
    # Pass 3: the doubtful rest of both, all bands together, most similar first.
    sure = p.agreement_at(p.threshold, -1.0)  # a standard deviation above: very likely near duplicates
    doubtful_pairs, doubtful_agree, pending = [], [], []

    def sure_now(pairs: np.ndarray) -> None:
        pairs, agree = clusters.candidates(pairs)
        hi = agree >= sure
        clusters.add(_rows(pairs, hi), agree[hi])
        doubtful_pairs.append(_rows(pairs, ~hi))
        doubtful_agree.append(agree[~hi])

    for star, others in _each_band(keys, p):
        sure_now(star)
        pending.append(others.astype(np.int32, copy=False))
        if sum(len(x) for x in pending) > p.max_pending:
            sure_now(np.concatenate(pending))
            pending = []
    if pending:
        sure_now(np.concatenate(pending))
    del pending
    pairs, agree = np.concatenate(doubtful_pairs), np.concatenate(doubtful_agree)
    once = _first_of_each(np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1]))
    clusters.add(pairs[once], agree[once])  # a pair found by several bands is verified once
    pairs = np.concatenate(clusters.edges).astype(np.int64) if clusters.edges else np.zeros((0, 2), np.int64)
    sims = np.concatenate(clusters.sims) if clusters.sims else np.zeros(0)
    pairs = np.sort(pairs, axis=1)
    keeper = _keeper_split(clusters, pairs) if keepers else None
    return NearDuplicates(clusters.root, pairs, sims, clusters.verified, keeper)


def _keeper_split(clusters: _Clusters, forest: np.ndarray) -> np.ndarray:
    """Per text, a keeper: an index <= its own, every text at Jaccard >= threshold with its keeper.

    Chains make big clusters out of templated text (a~b~c~...: the ends can be far apart).
    Here each chain cluster is split so that every member is a verified near duplicate of
    its keeper, the cluster's smallest index (the lead orders texts best first): members that
    fail against it are re-clustered among themselves (along the forest's edges between
    them) and each part gets its own keeper, until every member passes. The split clusters
    stay inside their chain cluster, which remains the unit for leakage-free splits.
    Verification is skipped where the sketches already say "far below the threshold", and not
    repeated for pairs the clustering verified (the forest's edges passed, its failures are kept).
    """
    p, n = clusters.p, len(clusters.root)
    failed = np.concatenate(clusters.failed) if clusters.failed else np.zeros((0, 2), np.int64)
    known = np.concatenate((forest[:, 0] * n + forest[:, 1],
                            np.minimum(failed[:, 0], failed[:, 1]).astype(np.int64) * n
                            + np.maximum(failed[:, 0], failed[:, 1])))
    order = np.argsort(known, kind="stable")
    known, known_passed = known[order], order < len(forest)
    keeper = clusters.root.copy()
    active = np.flatnonzero(keeper != np.arange(n))
    while active.size:
        pairs = np.stack((keeper[active], active), axis=1)  # keeper < member
        passed = np.zeros(active.size, bool)
        maybe = np.flatnonzero(clusters.agreement(pairs) >= clusters.need)
        if maybe.size:
            code = pairs[maybe, 0] * n + pairs[maybe, 1]
            at = np.minimum(np.searchsorted(known, code), max(len(known) - 1, 0))
            hit = known[at] == code if len(known) else np.zeros(maybe.size, bool)
            result = np.zeros(maybe.size, bool)
            result[hit] = known_passed[at[hit]]
            todo = np.flatnonzero(~hit)
            if todo.size:
                sim = _exact_pairs(clusters.arr, pairs[maybe[todo]], p.shingle_size, clusters.pool, p.verify_batch,
                                   clusters.alphabet)
                result[todo] = sim >= p.threshold - 1e-12
            clusters.verified += maybe.size  # the known ones were verified before
            passed[maybe] = result
        failed = active[~passed]
        if not failed.size:
            break
        inside = np.zeros(n, bool)
        inside[failed] = True
        edges = forest[inside[forest[:, 0]] & inside[forest[:, 1]]]
        parts = _components(np.arange(n, dtype=np.int64), edges) if len(edges) else np.arange(n)
        keeper[failed] = parts[failed]
        active = failed[parts[failed] != failed]
    return keeper


def near_duplicate_clusters(texts, *, threshold: float = 0.8, shingle_size: int = 3, num_perm: int = 128,
                            bands: int = 16, workers: int = 2, linkage: str = "chain", **tuning) -> np.ndarray:
    """For each text, the index of its near-duplicate cluster's root (the cluster's smallest index).

    `texts`: a pyarrow string array or a list of str, normalized, no nulls.
    linkage="chain": clusters are connected by chains of verified pairs.
    linkage="keeper": every text is a verified near duplicate of its root (see `_keeper_split`).
    """
    if linkage not in ("chain", "keeper"):
        raise ValueError(f"linkage={linkage!r}: expected 'chain' or 'keeper'")
    found = find_near_duplicates(texts, threshold=threshold, shingle_size=shingle_size, num_perm=num_perm,
                                 bands=bands, workers=workers, keepers=linkage == "keeper", **tuning)
    return found.roots if linkage == "chain" else found.keepers
