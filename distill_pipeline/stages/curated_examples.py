"""curated_examples: validate teacher outputs, filter, quarantine, and remove duplicates.

Order of work, each step only on the rows that survived the previous one:
  1. input checks (NULL, empty, not UTF-8, too short/long, not Latin script)   vectorized
  2. teacher output parsed and validated for the task kind; output length; confidence
  3. exact duplicates: same normalized input (lowercase, whitespace collapsed)
  4. near duplicates: MinHash LSH over character shingles, verified at Jaccard >= threshold
In each duplicate cluster the highest-confidence member is kept (ties: the earliest);
a near duplicate is dropped only when it is itself within the threshold of the row
kept in its place (chains a~b~c do not drop c for a). Every dropped row goes to the
quarantine table with a reason code and a detail; skip examples ({"skip": true})
are ordinary examples and are kept.

The cluster key (used for sticky, leakage-free splits) is a hash of the normalized
input of the earliest row of the whole chain cluster (near duplicates of near
duplicates), so it does not change when later duplicates arrive.

A later run with few new or changed rows curates only those and the clusters they
touch (stages/curation_state.py; curate.incremental).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill_pipeline.config import DEFAULT_MIN_CONFIDENCE, CurateConfig, PipelineConfig
from distill_pipeline.stages import dedup
from distill_pipeline.stages.inputs import InputProblem, check_input
from distill_pipeline.stages.tasks import parse_output

EXAMPLES = "examples.parquet"
QUARANTINE = "quarantine.parquet"
MANIFEST = "manifest.json"

QUARANTINE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input", pa.string()),
    ("input_raw", pa.binary()),  # original bytes when the input was not valid UTF-8
    ("output", pa.string()),
    ("confidence", pa.float64()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("cluster_key", pa.string()),  # duplicates only: the (chain) cluster they belong to
])


@dataclass
class CurateResult:
    examples: pa.Table
    quarantine: pa.Table
    counts: dict[str, int]
    seconds: float
    # What a later incremental run needs (see curation_state): every row that reached the
    # duplicate steps (id, text_key, cluster_key), and each distinct normalized text once.
    dedup_rows: pa.Table | None = None
    groups: pa.Table | None = None


def build_curated_examples(cfg: PipelineConfig, prompt_version: str) -> tuple[CurateResult, dict]:
    """The stage: this version's teacher labels curated, written, and described (result, manifest)."""
    from distill_pipeline.stages import curation_state
    from distill_pipeline.stages.teacher_labels import read_labels

    labels = read_labels(cfg, prompt_version)
    out_dir = cfg.stage_dir("curated_examples", prompt_version)
    update = curation_state.curate_incrementally(labels, cfg, out_dir, out_dir / EXAMPLES, out_dir / QUARANTINE) \
        if cfg.curate.incremental else None
    if update is None:
        result = curate_table(labels, cfg)
        facts, state = {"mode": "full"}, curation_state.state_of_full_run(cfg, labels, result)
    else:
        result, facts, state = update
    curation_state.forget_state(out_dir)
    manifest = write_curated(result, out_dir, prompt_version, facts)
    curation_state.write_state(out_dir, cfg, *state)
    return result, manifest


def read_examples(cfg: PipelineConfig, prompt_version: str) -> pa.Table:
    path = cfg.stage_dir("curated_examples", prompt_version) / EXAMPLES
    if not path.is_file():
        raise FileNotFoundError(f"no curated examples for prompt version {prompt_version} at {path}: "
                                "materialize curated_examples for that partition first")
    return pq.read_table(path)


def normalize(texts: pa.Array) -> pa.Array:
    """Lowercase, collapse whitespace, trim: the form duplicates are judged on."""
    lowered = pc.utf8_lower(texts)
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(lowered, r"\s+", " "))


def text_key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def _decode_inputs(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None], list[bytes | None]]:
    """Inputs as a string array; binary (bytea) inputs are decoded, failures reported per row."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    errors: list[str | None] = [None] * n
    raw: list[bytes | None] = [None] * n
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string()), errors, raw
    if pa.types.is_null(column.type):
        return pa.nulls(n, pa.string()), errors, raw
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise TypeError(f"source column `input` has type {column.type}; expected text or bytea")
    decoded: list[str | None] = []
    for i, value in enumerate(column.to_pylist()):
        text, problem, detail = check_input(value)
        if problem is InputProblem.NOT_UTF8:
            raw[i], errors[i] = value, detail
            text = None
        decoded.append(value.decode("utf-8") if problem is InputProblem.EMPTY else text)
    return pa.array(decoded, pa.string()), errors, raw


def _label_reasons(table: pa.Table) -> list[tuple[str, str] | None]:
    """Rows teacher_labels could not label (its `status` column), with its error as the detail."""
    n = table.num_rows
    if "status" not in table.column_names:
        return [None] * n
    reasons: list[tuple[str, str] | None] = [None] * n
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    problems = table.column("input_problem").to_pylist() if "input_problem" in table.column_names else [None] * n
    inputs = table.column("input").to_pylist()
    for i, status in enumerate(table.column("status").to_pylist()):
        error = errors[i] or status
        if status == "invalid_input":
            problem = problems[i] or (check_input(inputs[i])[1] or InputProblem.NOT_TEXT).value
            reasons[i] = (problem, error)
        elif status in ("failed", "over_budget"):
            reasons[i] = (f"teacher_{status}", error)
    return reasons


def _input_reasons(inputs: pa.Array, decode_errors: list, cfg: CurateConfig,
                   reasons: list[tuple[str, str] | None]) -> list[tuple[str, str] | None]:
    n = len(inputs)
    lengths = pc.utf8_length(inputs).to_numpy(zero_copy_only=False)
    stripped = pc.utf8_length(pc.utf8_trim_whitespace(inputs)).to_numpy(zero_copy_only=False)
    nulls = inputs.is_null().to_numpy(zero_copy_only=False)
    if cfg.min_latin_letter_ratio is not None:
        # ASCII letters are Latin: count scripts (slow regexes) only where non-ASCII text appears.
        letters, latin = np.zeros(n), np.zeros(n)
        non_ascii = np.flatnonzero(~pc.fill_null(pc.string_is_ascii(inputs), True).to_numpy(zero_copy_only=False))
        if non_ascii.size:
            subset = inputs.take(pa.array(non_ascii))
            letters[non_ascii] = pc.count_substring_regex(subset, r"\p{L}").to_numpy(zero_copy_only=False)
            latin[non_ascii] = pc.count_substring_regex(subset, r"\p{Latin}").to_numpy(zero_copy_only=False)
    for i in range(n):
        if reasons[i] is not None:
            continue
        if decode_errors[i]:
            reasons[i] = (InputProblem.NOT_UTF8.value, decode_errors[i])
        elif nulls[i]:
            reasons[i] = (InputProblem.NULL.value, "input is NULL")
        elif stripped[i] == 0:
            reasons[i] = (InputProblem.EMPTY.value, "input is empty")
        elif lengths[i] > cfg.max_input_chars:
            reasons[i] = ("input_too_long", f"{int(lengths[i])} chars > curate.max_input_chars={cfg.max_input_chars}")
        elif stripped[i] < cfg.min_input_chars:
            reasons[i] = ("input_too_short", f"{int(stripped[i])} chars < curate.min_input_chars={cfg.min_input_chars}")
        elif cfg.min_latin_letter_ratio is not None and letters[i] > 0 \
                and latin[i] / letters[i] < cfg.min_latin_letter_ratio:
            reasons[i] = ("language", f"{latin[i] / letters[i]:.0%} of letters are Latin script "
                                      f"< curate.min_latin_letter_ratio={cfg.min_latin_letter_ratio}")
    return reasons


def infer_confidence_scale(confidence: np.ndarray) -> str:
    """The scale the stored confidences are on (curate.confidence_scale: auto)."""
    known = confidence[~np.isnan(confidence)]
    if known.size == 0 or (known.min() >= 0 and known.max() <= 1):
        return "0-1"
    if known.max() <= 0:
        return "logprob"
    return "0-10" if known.min() >= 0 and known.max() <= 10 else "0-100"


def confidence_threshold(c: CurateConfig, confidence: np.ndarray) -> tuple[str, float | None]:
    """(scale, threshold) of the confidence filter; the threshold is None when the filter is off."""
    scale = infer_confidence_scale(confidence) if c.confidence_scale == "auto" else c.confidence_scale
    if not c.filter_confidence:
        return scale, None
    return scale, c.min_confidence if c.min_confidence is not None else DEFAULT_MIN_CONFIDENCE[scale]


def _check_confidence_filter(reasons: list, confidence: np.ndarray, threshold: float | None, scale: str,
                             c: CurateConfig) -> None:
    """A filter dropping most rows is a threshold meant for another scale: stop before quarantining the table."""
    dropped = sum(1 for r in reasons if r is not None and r[0] == "low_confidence")
    judged = dropped + sum(1 for i, r in enumerate(reasons) if r is None and not np.isnan(confidence[i]))
    if threshold is not None and judged and dropped / judged > c.max_low_confidence_share:
        raise ValueError(
            f"the confidence filter would quarantine {dropped} of {judged} rows that have a confidence "
            f"({dropped / judged:.0%} > curate.max_low_confidence_share={c.max_low_confidence_share:g}): "
            f"curate.min_confidence={threshold:g} on the {scale} scale (curate.confidence_scale="
            f"{c.confidence_scale}; stored values range {np.nanmin(confidence):g}..{np.nanmax(confidence):g}). "
            "Set curate.confidence_scale / curate.min_confidence to fit your column, or curate.filter_confidence: false")


def curate_table(table: pa.Table, cfg: PipelineConfig,
                 confidence_filter: tuple[str, float | None] | None = None) -> CurateResult:
    """Curate rows with columns id, input, output, confidence, created_at (+ status, error from teacher_labels).

    `confidence_filter` (scale, threshold) replaces the one inferred from the rows: an incremental run
    curates a few rows with the filter the whole table got.
    """
    started = time.perf_counter()
    c = cfg.curate
    n = table.num_rows
    ids = [str(v) for v in table.column("id").to_pylist()]
    inputs, decode_errors, raw_bytes = _decode_inputs(table.column("input"))
    outputs = table.column("output").cast(pa.string()).to_pylist() if "output" in table.column_names \
        else [None] * n
    conf_col = table.column("confidence") if "confidence" in table.column_names else pa.nulls(n, pa.float64())
    confidence = conf_col.cast(pa.float64()).to_numpy(zero_copy_only=False)  # NaN where unknown
    created = table.column("created_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()) \
        .to_numpy(zero_copy_only=False)

    reasons = _input_reasons(inputs, decode_errors, c, _label_reasons(table))
    scale, threshold = confidence_filter or confidence_threshold(c, confidence)
    targets: list[str | None] = [None] * n
    parsed_short: dict[str, object] = {}
    labels: list[str | None] = [None] * n
    for i in range(n):
        if reasons[i] is not None:
            continue
        out = outputs[i]
        if out is not None and len(out) > c.max_output_chars:
            reasons[i] = ("output_too_long", f"{len(out)} chars > curate.max_output_chars={c.max_output_chars}")
            continue
        parsed = parsed_short.get(out) if out is not None and len(out) <= 64 else None
        if parsed is None:
            parsed = parse_output(cfg.task, out)
            if out is not None and len(out) <= 64:  # short answers ({"skip": true}, labels) repeat a lot
                parsed_short[out] = parsed
        if not parsed.ok:
            reasons[i] = ("output_invalid", parsed.error)
            continue
        if np.isnan(confidence[i]):
            if c.missing_confidence == "drop":
                reasons[i] = ("no_confidence", "no confidence (curate.missing_confidence=drop)")
                continue
        elif threshold is not None and confidence[i] < threshold:
            reasons[i] = ("low_confidence", f"confidence {confidence[i]:g} < {threshold:g} (curate.min_confidence, "
                                            f"{scale} scale)")
            continue
        targets[i], labels[i] = parsed.target, parsed.label
    _check_confidence_filter(reasons, confidence, threshold, scale, c)

    valid = np.array([r is None for r in reasons])
    valid_idx = np.flatnonzero(valid)
    norm = normalize(inputs.take(pa.array(valid_idx))).to_pylist() if len(valid_idx) else []

    # Best member first: highest confidence (unknown counts as lowest), then earliest, then id.
    conf_rank = np.where(np.isnan(confidence), -np.inf, confidence)
    order = valid_idx[np.lexsort((np.array(ids, dtype=object)[valid_idx].astype(str), created[valid_idx],
                                  -conf_rank[valid_idx]))] if len(valid_idx) else valid_idx
    pos_of = {int(row): k for k, row in enumerate(valid_idx)}

    # 3. exact duplicates
    group_of_text: dict[str, int] = {}
    groups: list[list[int]] = []  # rows per exact group, best first
    for row in order:
        text = norm[pos_of[int(row)]]
        g = group_of_text.setdefault(text, len(groups))
        if g == len(groups):
            groups.append([])
        groups[g].append(int(row))
    group_texts = list(group_of_text)

    # 4. near duplicates, between the exact groups' texts (in best-first order). Two clusterings:
    # chains (a~b~c, transitively) are the unit of splitting, so nothing similar straddles splits;
    # keeper clusters decide what is dropped: every dropped row is itself a verified near
    # duplicate (Jaccard >= threshold) of the row kept in its place, never just a chain neighbour.
    found = dedup.find_near_duplicates(
        pa.array(group_texts, pa.string()), keepers=True, threshold=c.near_duplicate_threshold,
        shingle_size=c.shingle_size, num_perm=c.num_perm, bands=c.lsh_bands, workers=c.workers,
    ) if group_texts else None
    chain = found.roots if found else np.zeros(0, np.int64)
    keeper_of = found.keepers if found else np.zeros(0, np.int64)
    group_earliest = [min((created[r], ids[r]) for r in rows) for rows in groups]
    chain_earliest: dict[int, int] = {}
    for g, root in enumerate(chain):
        best = chain_earliest.setdefault(int(root), g)
        if group_earliest[g] < group_earliest[best]:
            chain_earliest[int(root)] = g
    # the chain's earliest row names the cluster: later arrivals do not rename it
    group_keys = [text_key(group_texts[chain_earliest[int(root)]]) for root in chain]
    kept_clusters: dict[int, list[int]] = {}
    for g, k in enumerate(keeper_of):
        kept_clusters.setdefault(int(k), []).append(g)

    keep_rows, keep_keys, keep_dups = [], [], []
    dropped_key: dict[int, str] = {}  # duplicates remember their cluster too (audits, leakage)
    for k, members in kept_clusters.items():
        keeper = groups[k][0]  # k is its cluster's smallest index: the best group, best row first
        keep_rows.append(keeper)
        key = group_keys[k]
        keep_keys.append(key)
        keep_dups.append(sum(len(groups[g]) for g in members) - 1)
        for g in members:
            for row in groups[g]:
                if row != keeper:
                    code = "exact_duplicate" if g == k else "near_duplicate"
                    reasons[row] = (code, f"duplicate of id {ids[keeper]}")
                    dropped_key[row] = key

    dedup_ids, dedup_groups = [], []
    for g, rows in enumerate(groups):
        dedup_ids.extend(ids[r] for r in rows)
        dedup_groups.extend([g] * len(rows))
    group_text_keys = [text_key(t) for t in group_texts]
    dedup_rows = pa.table({"id": pa.array(dedup_ids, pa.string()),
                           "text_key": pa.array([group_text_keys[g] for g in dedup_groups], pa.string()),
                           "cluster_key": pa.array([group_keys[g] for g in dedup_groups], pa.string())})
    best = np.array([rows[0] for rows in groups], dtype=np.int64)
    group_table = pa.table({
        "text_key": pa.array(group_text_keys, pa.string()), "text": pa.array(group_texts, pa.string()),
        "cluster_key": pa.array(group_keys, pa.string()),
        "keeper_id": pa.array([ids[groups[int(k)][0]] for k in keeper_of], pa.string()),
        "is_keeper": pa.array(keeper_of == np.arange(len(groups)), pa.bool_()),
        "is_lead": pa.array(chain == np.arange(len(groups)), pa.bool_()),  # the best group of its chain
        # the group's best row, in the best-first order (confidence, then earliest, then id)
        "best_confidence": pa.array(conf_rank[best] if len(best) else [], pa.float64()),
        "best_created": pa.array(created[best] if len(best) else [], pa.int64()),
        "best_id": pa.array([ids[r] for r in best], pa.string()),
        # its earliest row: the chain's earliest group names the chain
        "first_created": pa.array([e[0] for e in group_earliest], pa.int64()),
        "first_id": pa.array([e[1] for e in group_earliest], pa.string()),
    })

    keep_order = np.argsort(np.array(keep_rows, dtype=np.int64), kind="stable")
    keep_idx = np.array(keep_rows, dtype=np.int64)[keep_order]
    examples = pa.table({
        "id": pa.array([ids[i] for i in keep_idx], pa.string()),
        "input": inputs.take(pa.array(keep_idx, pa.int64())),
        "target": pa.array([targets[i] for i in keep_idx], pa.string()),
        "label": pa.array([labels[i] for i in keep_idx], pa.string()),
        "confidence": pa.array(confidence[keep_idx], pa.float64(), from_pandas=True),
        "cluster_key": pa.array([keep_keys[k] for k in keep_order], pa.string()),
        "duplicates": pa.array([keep_dups[k] for k in keep_order], pa.int32()),
        "created_at": table.column("created_at").take(pa.array(keep_idx, pa.int64())),
    })

    dropped = [i for i in range(n) if reasons[i] is not None]
    quarantine = pa.table({
        "id": pa.array([ids[i] for i in dropped], pa.string()),
        "input": inputs.take(pa.array(dropped, pa.int64())),
        "input_raw": pa.array([raw_bytes[i] for i in dropped], pa.binary()),
        "output": pa.array([outputs[i] for i in dropped], pa.string()),
        "confidence": pa.array(confidence[dropped] if dropped else [], pa.float64(), from_pandas=True),
        "reason": pa.array([reasons[i][0] for i in dropped], pa.string()),
        "detail": pa.array([reasons[i][1] for i in dropped], pa.string()),
        "cluster_key": pa.array([dropped_key.get(i) for i in dropped], pa.string()),
    }, schema=QUARANTINE_SCHEMA)

    counts = Counter(r[0] for r in reasons if r is not None)
    summary = {"rows_in": n, "kept": examples.num_rows, "quarantined": quarantine.num_rows,
               **{f"dropped_{k}": v for k, v in sorted(counts.items())},
               "confidence_scale": scale, "min_confidence": threshold,
               "rows_without_confidence": int(np.isnan(confidence).sum())}
    summary["kept_skip"] = sum(1 for i in keep_idx if labels[i] == "skip")
    return CurateResult(examples, quarantine, summary, time.perf_counter() - started, dedup_rows, group_table)


def write_curated(result: CurateResult, out_dir: Path, prompt_version: str, facts: dict | None = None) -> dict:
    """Write examples, quarantine and a manifest (with `facts`: how the run went); returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.examples, out_dir / EXAMPLES)
    pq.write_table(result.quarantine, out_dir / QUARANTINE)
    labels = Counter(result.examples.column("label").to_pylist())
    manifest = {
        "prompt_version": prompt_version,
        "counts": result.counts,
        "labels": dict(sorted(labels.items())),
        "duplicate_rate": round((result.counts.get("dropped_exact_duplicate", 0)
                                 + result.counts.get("dropped_near_duplicate", 0)) / max(result.counts["rows_in"], 1), 4),
        "seconds": round(result.seconds, 3),
        **(facts or {}),
        "examples_path": str(out_dir / EXAMPLES),
        "quarantine_path": str(out_dir / QUARANTINE),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
