"""The asset checks' own computations. Each recomputes what it guards by a route independent of the code
that produced it (a check that reruns the producer's logic cannot fail), so this module imports no stage.

- `targets_violating_schema`: the curated targets as written to disk, validated by `jsonschema` against the
  schema derived from the task config (not by the parser that made them).
- `near_duplicates_across_splits`: the written splits searched for near-duplicate pairs across splits by
  a detector of its own (a textbook MinHash with other shingle ids, hashes and bands than the splitter's
  engine, every candidate's Jaccard computed exactly), not by the engine the splitter used to keep
  clusters together.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from distill_pipeline.config import TaskConfig
from distill_pipeline.stages.task_schema import answer_schema


def targets_violating_schema(task: TaskConfig, examples_path: Path, show: int = 5) -> tuple[int, int, list[dict]]:
    """(targets checked, targets violating the task's schema, the first few violations with their id and reason)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(answer_schema(task), format_checker=Draft202012Validator.FORMAT_CHECKER)
    table = pq.read_table(examples_path, columns=["id", "target"])
    bad, shown = 0, []
    for row_id, target in zip(table.column("id").to_pylist(), table.column("target").to_pylist()):
        if target is None:
            problem = "target is NULL"
        else:
            try:
                value = target if task.kind in ("classification", "generation") else json.loads(target)
                error = best_match(validator.iter_errors(value))
                problem = None if error is None else _explain(error)
            except ValueError as exc:
                problem = f"target is not JSON: {exc}"
        if problem is not None:
            bad += 1
            if len(shown) < show:
                shown.append({"id": row_id, "target": (target or "")[:200], "problem": problem[:300]})
    return table.num_rows, bad, shown


def _explain(error: Any) -> str:
    """The message of a schema error; for `anyOf` (event or skip), that of the branch the value came closest to."""
    if not error.context:
        return error.message
    by_branch: dict[Any, list] = defaultdict(list)
    for sub in error.context:
        by_branch[sub.relative_schema_path[0]].append(sub)
    return _explain(min(by_branch.values(), key=len)[0])


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _shingle_ids(text: str, k: int) -> np.ndarray:
    grams = [text] if len(text) < k else [text[i:i + k] for i in range(len(text) - k + 1)]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), np.int64, len(grams)))


_PAD = 0x1FFFFF  # above every code point: pads a text shorter than k, so its one shingle is none of a longer one's


def _shingle_table(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc, shingle id) once per distinct shingle of each text, sorted by doc then id.

    For k <= 3 the id is the shingle itself, its k code points side by side in 21 bits each (exact, all
    texts at once in numpy); for longer shingles the CRC32 of its UTF-8, text by text.
    """
    n = len(texts)
    if k > 3:
        parts = [_shingle_ids(t, k) for t in texts]
        docs = np.repeat(np.arange(n), [len(x) for x in parts])
        return docs, (np.concatenate(parts) if parts else np.zeros(0, np.int64))
    lengths = np.fromiter((len(t) for t in texts), np.int64, n)
    chars = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32).astype(np.int64)
    chars = np.concatenate([chars, np.full(k, _PAD, np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
    count = np.maximum(lengths - k + 1, 1)  # windows per text; a short text is one (padded) shingle
    doc = np.repeat(np.arange(n), count)
    pos = np.repeat(starts - np.concatenate([[0], np.cumsum(count)[:-1]]), count) + np.arange(count.sum())
    ids = np.zeros(len(pos), np.int64)
    end = np.repeat(starts + lengths, count)
    for j in range(k):
        at = pos + j
        ids = (ids << 21) | np.where(at < end, chars[np.minimum(at, len(chars) - 1)], _PAD)
    order = np.lexsort((ids, doc))
    doc, ids = doc[order], ids[order]
    first = np.concatenate([[True], (doc[1:] != doc[:-1]) | (ids[1:] != ids[:-1])]) if len(ids) else np.zeros(0, bool)
    return doc[first], ids[first]


def _band_keys(rows: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a band (a collision only adds a candidate, verified like any other)."""
    mult = np.array([0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], np.uint64)
    key = np.zeros(len(rows), np.uint64)
    for j in range(rows.shape[1]):
        key = (key ^ rows[:, j].astype(np.uint64)) * mult[j % 4]
    return key


def near_duplicates_across_splits(splits: dict[str, Any], threshold: float, shingle_size: int, *,
                                  num_perm: int = 128, rows_per_band: int = 4, seed: int = 20261202,
                                  show: int = 5, checked_before: np.ndarray | None = None) -> tuple[int, list[dict]]:
    """(pairs of inputs in different splits with Jaccard >= threshold, the most similar few of them).

    A textbook MinHash (exact shingle ids, `num_perm` multiply-shift hashes) with its own
    banding (4 rows per band: a pair at J = 0.8 shares no band with probability ~1e-7); the pairs of a
    bucket that spans two splits whose signatures roughly agree are verified by exact Jaccard; buckets
    within one split cost nothing. `checked_before` (per row, in the splits' order): rows this check passed
    before with the same input in the same split; a pair of two such rows is not looked at again.
    """
    rng = np.random.default_rng(seed)
    # multiply-shift hashes: (a*x + b mod 2^64) >> 33, a odd
    a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
    names, texts = [], []
    for name, table in splits.items():
        for text in table.column("input").to_pylist():
            names.append(name)
            texts.append(_normalized(text or ""))
    found: dict[tuple[int, int], float] = {}
    if texts:
        doc, ids = _shingle_table(texts, shingle_size)
        bounds = np.searchsorted(doc, np.arange(len(texts) + 1))
        x = ids.astype(np.uint64)
        sigs = np.empty((num_perm, len(texts)), np.uint64)
        for c in range(num_perm):  # one hash over every shingle at a time, its minimum per text
            sigs[c] = np.minimum.reduceat((x * a[c] + b[c]) >> np.uint64(33), bounds[:-1])
        sigs = np.ascontiguousarray(sigs.T)
        sets: dict[int, frozenset] = {}

        def shingles(d: int) -> frozenset:
            if d not in sets:
                sets[d] = frozenset(ids[bounds[d]:bounds[d + 1]].tolist())
            return sets[d]

        split_of = np.unique(np.array(names), return_inverse=True)[1]
        # Candidates whose signatures agree on fewer slots than J = threshold less 4 standard deviations of the
        # estimate are not verified (a true pair is dropped with probability ~3e-5).
        cut = threshold - 4 * np.sqrt(threshold * (1 - threshold) / num_perm)
        bands = sigs.reshape(len(texts), -1, rows_per_band)
        candidates = []
        for band in range(bands.shape[1]):
            keys = _band_keys(bands[:, band, :])
            order = np.argsort(keys, kind="stable")
            sk, ss = keys[order], split_of[order]
            group_start = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
            sizes = np.diff(np.append(group_start, len(sk)))
            spanning = np.minimum.reduceat(ss, group_start) != np.maximum.reduceat(ss, group_start)
            if checked_before is not None:  # a bucket of rows all passed before holds no new pair
                spanning &= np.minimum.reduceat(checked_before[order].astype(np.int8), group_start) == 0
            # buckets spanning two splits: every pair of members, size class by size class (a bucket of
            # m members at once as m*(m-1)/2 index pairs), members in one split dropped
            for m in np.unique(sizes[spanning]):
                firsts = group_start[spanning & (sizes == m)]
                iu, ju = np.triu_indices(int(m), 1)
                for start in range(0, len(firsts), max(1, (1 << 20) // len(iu))):  # bounded memory
                    base = firsts[start:start + max(1, (1 << 20) // len(iu)), None]
                    left, right = order[(base + iu).ravel()], order[(base + ju).ravel()]
                    cross = split_of[left] != split_of[right]
                    if checked_before is not None:
                        cross &= ~(checked_before[left] & checked_before[right])
                    left, right = left[cross], right[cross]
                    agree = np.empty(len(left))
                    for lo in range(0, len(left), 1 << 16):
                        agree[lo:lo + (1 << 16)] = (sigs[left[lo:lo + (1 << 16)]]
                                                    == sigs[right[lo:lo + (1 << 16)]]).mean(axis=1)
                    keep = agree >= cut
                    candidates.append(np.stack((np.minimum(left, right)[keep], np.maximum(left, right)[keep]), 1))
        pairs = np.unique(np.concatenate(candidates), axis=0) if candidates else np.zeros((0, 2), np.int64)
        for x_, y_ in pairs.tolist():  # pairs sharing several bands are verified once
            sa, sb = shingles(x_), shingles(y_)
            similarity = len(sa & sb) / len(sa | sb)
            if similarity >= threshold:
                found[(x_, y_)] = similarity
    ranked = sorted(found.items(), key=lambda item: -item[1])
    examples = [{"a": texts[x][:120], "b": texts[y][:120], "splits": [names[x], names[y]], "jaccard": round(sim, 3)}
                for (x, y), sim in ranked[:show]]
    return len(found), examples


def cluster_keys_in_two_splits(splits: dict[str, Any]) -> int:
    """Duplicate clusters (cluster_key) whose members landed in more than one split."""
    where: dict[str, set[str]] = defaultdict(set)
    for name, table in splits.items():
        for key in table.column("cluster_key").to_pylist():
            where[key].add(name)
    return sum(1 for names in where.values() if len(names) > 1)


def _row_keys(splits: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(split, id, a digest of the input) per row, in the splits' order."""
    return [(name, str(rid), hashlib.blake2b((text or "").encode(), digest_size=8).hexdigest())
            for name, table in splits.items()
            for rid, text in zip(table.column("id").to_pylist(), table.column("input").to_pylist())]


def check_leakage(splits: dict[str, Any], threshold: float, shingle_size: int,
                  memory: Path | None = None) -> tuple[bool, dict]:
    """No duplicate cluster and no near-duplicate pair of inputs (found exactly, see above) in two splits.

    `memory`: a file of the rows this check passed last time (its own record, not the split stage's); a pair
    of rows both there unchanged, in the same splits, was already found clean, so a night with few new rows
    looks only at pairs with a new row. A failed check forgets it.
    """
    shared = cluster_keys_in_two_splits(splits)
    rows = _row_keys(splits)
    before = None
    if memory is not None and memory.is_file():
        passed = set(map(tuple, json.loads(memory.read_text())))
        before = np.fromiter((r in passed for r in rows), bool, len(rows))
    pairs, examples = near_duplicates_across_splits(splits, threshold, shingle_size, checked_before=before)
    ok = not shared and not pairs
    if memory is not None:
        memory.unlink(missing_ok=True)
        if ok:
            memory.parent.mkdir(parents=True, exist_ok=True)
            memory.write_text(json.dumps(rows))
    return ok, {"clusters_in_two_splits": shared, "near_duplicate_pairs_across_splits": pairs,
                "examples": examples, "rows_checked_before": int(before.sum()) if before is not None else 0}


def label_shares(labels: list) -> dict[str, float]:
    counts = Counter(labels)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items())}


def check_label_balance(splits: dict[str, Any], max_gap: float) -> tuple[bool, dict]:
    """Each split's label shares stay within `max_gap` of the whole's."""
    whole = label_shares([x for part in splits.values() for x in part.column("label").to_pylist()])
    worst = {}
    for name, part in splits.items():
        mine = label_shares(part.column("label").to_pylist())
        gaps = {label: abs(mine.get(label, 0.0) - share) for label, share in whole.items()}
        label, gap = max(gaps.items(), key=lambda kv: kv[1]) if gaps else ("-", 0.0)
        worst[name] = {"label": label, "gap": round(gap, 4)}
    return all(w["gap"] <= max_gap for w in worst.values()), {"worst_gap_per_split": worst, "max_gap": max_gap}


def answers_mostly_usable(counts: dict[str, int], rows: int, max_bad_share: float) -> tuple[bool, float]:
    """(passed, share of answerable inputs that failed, came back invalid or were left over budget)."""
    answerable = rows - counts.get("invalid_input", 0)
    bad = counts.get("failed", 0) + counts.get("invalid", 0) + counts.get("over_budget", 0)
    share = round(bad / answerable, 4) if answerable else 0.0
    return share <= max_bad_share, share


def check_field_balance(splits: dict[str, Any], task: TaskConfig, max_gap: float) -> tuple[bool, dict]:
    """Every enum field's value shares per split within `max_gap` of the whole's, read from the written targets
    (so a multi-field task is balanced on each field, not only on the combination it is stratified on)."""
    fields = [name for name, spec in task.fields.items() if spec.enum is not None] if task.kind == "extraction" else []
    worst: dict[str, dict] = {}
    passed = True
    for name in fields:
        values = {}
        for split, part in splits.items():
            objects = [json.loads(t) for t in part.column("target").to_pylist()]
            values[split] = [str(o.get(name)) for o in objects if task.skip_key is None or task.skip_key not in o]
        whole = label_shares([v for vs in values.values() for v in vs])
        gaps = {}
        for split, vs in values.items():
            mine = label_shares(vs)
            value, gap = max(((v, abs(mine.get(v, 0.0) - share)) for v, share in whole.items()),
                             key=lambda kv: kv[1], default=("-", 0.0))
            gaps[split] = {"value": value, "gap": round(gap, 4)}
        worst[name] = gaps
        passed = passed and all(g["gap"] <= max_gap for g in gaps.values())
    return passed, {"worst_gap_per_field": worst, "max_gap": max_gap}
