"""Incremental curation: a night with few new rows re-curates only the clusters they touch.

Next to its outputs curated_examples keeps a state (state/ under its stage directory):
  rows.arrow      every labelled row it judged: id, a hash of what curation reads from it, and for
                  rows that reached the duplicate steps their text_key and (chain) cluster_key
  groups.arrow    each distinct normalized text once: text_key, text, cluster_key, and its MinHash
                  band keys and sketch (text_index)
  settings.json   the settings the state was built with (curation, task) and the confidence filter

A later run finds the rows that are new or changed (by id and hash) or gone. The duplicate
clusters they touch are: those of changed and gone rows, those holding a new row's exact text,
and those holding a verified near duplicate of one (new texts looked up in the stored band keys).
Every row of those clusters, with the new rows, is curated again in one `curate_table` call,
under the confidence filter the whole table got; everything else keeps its result. A cluster
is closed under the duplicate relation, so re-curating it whole gives it the keeper, the
quarantine reasons and the cluster key a full run would give it.

A full run happens instead when there is no state, the settings changed, or more than
`MAX_INCREMENTAL_SHARE` of the rows would be re-curated anyway.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill_pipeline.config import PipelineConfig
from distill_pipeline.stages import dedup, text_index

STATE_DIR = "state"
ROWS, GROUPS, SETTINGS = "rows.arrow", "groups.arrow", "settings.json"
# Re-curating more than this share of the table costs about what a full run does: run that.
MAX_INCREMENTAL_SHARE = 0.3
# A new text in a huge LSH bucket is compared with at most this many stored texts.
MAX_CANDIDATES_PER_TEXT = 512
HASHED_COLUMNS = ("input", "output", "confidence", "created_at", "status", "error", "input_problem")


def detector_params(cfg: PipelineConfig) -> dedup.Params:
    c = cfg.curate
    return dedup.Params(threshold=c.near_duplicate_threshold, shingle_size=c.shingle_size, num_perm=c.num_perm,
                        bands=c.lsh_bands, workers=c.workers)


def settings_digest(cfg: PipelineConfig) -> str:
    """What the state depends on: every curation and task setting except the thread count."""
    settings = {"curate": cfg.curate.model_dump(mode="json", exclude={"workers", "incremental"}),
                "task": cfg.task.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def row_hashes(table: pa.Table) -> np.ndarray:
    """A 64-bit hash per row of everything curation reads from it (a changed row is curated again)."""
    columns = [c for c in HASHED_COLUMNS if c in table.column_names]
    if not table.num_rows or not columns:
        return np.zeros(table.num_rows, np.uint64)
    frame = table.select(columns).to_pandas()
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)


@dataclass
class State:
    rows: pa.Table  # id, row_hash, text_key, cluster_key
    groups: pa.Table  # text_key, text, cluster_key, keeper_id, is_keeper, is_lead, best_* (curate_table)
    signatures: text_index.Signatures
    confidence_filter: tuple[str, float | None]


def load_state(out_dir: Path, cfg: PipelineConfig) -> State | None:
    """The stored state, or None when there is none or it was built with other settings."""
    base = out_dir / STATE_DIR
    try:
        settings = json.loads((base / SETTINGS).read_text())
        if settings["digest"] != settings_digest(cfg):
            return None
        rows = text_index.read(base / ROWS)
        groups = text_index.read(base / GROUPS)
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    signatures = text_index.from_table(groups, cfg.curate.lsh_bands)
    return State(rows, groups.drop_columns([c for c in ("band_keys", "sketch") if c in groups.column_names]),
                 signatures,
                 (settings["confidence_scale"], settings["min_confidence"]))


def write_state(out_dir: Path, cfg: PipelineConfig, rows: pa.Table, groups: pa.Table,
                signatures: text_index.Signatures, confidence_filter: tuple[str, float | None]) -> None:
    base = out_dir / STATE_DIR
    base.mkdir(parents=True, exist_ok=True)
    (base / SETTINGS).unlink(missing_ok=True)  # written last: a half-written state is no state
    text_index.write(base / ROWS, {name: rows.column(name) for name in rows.column_names}, None)
    text_index.write(base / GROUPS, {name: groups.column(name) for name in groups.column_names}, signatures)
    scale, threshold = confidence_filter
    (base / SETTINGS).write_text(json.dumps({"digest": settings_digest(cfg), "confidence_scale": scale,
                                             "min_confidence": threshold}))


def state_rows(labels: pa.Table, hashes: np.ndarray, dedup_rows: pa.Table) -> pa.Table:
    """rows.arrow for `labels`: each row's hash and, where it reached the duplicate steps, its keys."""
    ids = pc.cast(labels.column("id"), pa.string()).combine_chunks()
    at = pc.index_in(ids, value_set=dedup_rows.column("id").combine_chunks())
    return pa.table({"id": ids, "row_hash": pa.array(hashes, pa.uint64()),
                     "text_key": dedup_rows.column("text_key").combine_chunks().take(at),
                     "cluster_key": dedup_rows.column("cluster_key").combine_chunks().take(at)})


def state_of_full_run(cfg: PipelineConfig, labels: pa.Table, result) -> tuple:
    """The state after a full run of curate_table over `labels` (write_state's arguments)."""
    signatures = text_index.signatures(result.groups.column("text"), detector_params(cfg))
    return (state_rows(labels, row_hashes(labels), result.dedup_rows), result.groups, signatures,
            (result.counts["confidence_scale"], result.counts["min_confidence"]))


def forget_state(out_dir: Path) -> None:
    """Before outputs are replaced: a crash before the new state is written leaves none (a full run next)."""
    (out_dir / STATE_DIR / SETTINGS).unlink(missing_ok=True)


def _matches(state: State, new_groups: pa.Table, new_sig: text_index.Signatures, cfg: PipelineConfig):
    """Stored groups each new text equals (index or -1), and verified near-duplicate pairs (new, stored)."""
    exact = pc.index_in(new_groups.column("text_key"), value_set=state.groups.column("text_key").combine_chunks())
    exact = exact.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    params = detector_params(cfg)
    pairs = text_index.candidates(new_sig, state.signatures, max_per_text=MAX_CANDIDATES_PER_TEXT)
    pairs, _ = text_index.similar_pairs(new_groups.column("text"), state.groups.column("text"), pairs, params,
                                        new_sig, state.signatures)
    return exact, pairs


class _Ranks:
    """Best-first order (confidence, then earliest, then id; smaller is better) and age of a table's groups."""

    def __init__(self, groups: pa.Table):
        self.best = list(zip((-groups.column("best_confidence").to_numpy(zero_copy_only=False)).tolist(),
                             groups.column("best_created").to_pylist(), groups.column("best_id").to_pylist()))
        self.first = list(zip(groups.column("first_created").to_pylist(), groups.column("first_id").to_pylist()))


def _renamed(table: pa.Table, rename: dict[str, str]) -> pa.Table:
    """`table` with its cluster_key values replaced through `rename`."""
    if not rename or not table.num_rows:
        return table
    at = table.schema.get_field_index("cluster_key")
    column = table.column(at).combine_chunks()
    old = pa.array(sorted(rename), pa.string())
    where = pc.index_in(column, value_set=old)
    new = pa.array([rename[k] for k in old.to_pylist()], pa.string()).take(where)
    return table.set_column(at, "cluster_key", pc.coalesce(new, column))


def _without(table: pa.Table, drop: pa.Array) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column("id"), value_set=drop)))


def _keys(values) -> pa.Array:
    return pa.array(sorted(values), pa.string())


def counts_of(labels: pa.Table, examples: pa.Table, quarantine: pa.Table,
              confidence_filter: tuple[str, float | None]) -> dict:
    """The summary curate_table gives, from the merged tables."""
    reasons = Counter(quarantine.column("reason").to_pylist())
    confidence = labels.column("confidence").cast(pa.float64()).to_numpy(zero_copy_only=False) \
        if "confidence" in labels.column_names else np.full(labels.num_rows, np.nan)
    return {"rows_in": labels.num_rows, "kept": examples.num_rows, "quarantined": quarantine.num_rows,
            **{f"dropped_{k}": v for k, v in sorted(reasons.items())},
            "confidence_scale": confidence_filter[0], "min_confidence": confidence_filter[1],
            "rows_without_confidence": int(np.isnan(confidence).sum()),
            "kept_skip": int(pc.sum(pc.equal(examples.column("label"), "skip")).as_py() or 0)}


def curate_incrementally(labels: pa.Table, cfg: PipelineConfig, out_dir: Path, previous_examples: Path,
                         previous_quarantine: Path):
    """(CurateResult, facts, the state to write once the outputs are) from the stored state and the previous
    outputs, or None when a full run is due.

    The new or changed rows are curated among themselves first. Each chain cluster they form is then
      untouched   no text equal or near to a stored one: its result stands;
      joining     every text of it either equals a stored text whose best row is better, or is decided
                  against the stored keepers it is close to (Jaccard >= threshold; the leads of the
                  stored chains it touches and the keepers of the stored texts it is near): it becomes a
                  duplicate of the best of them, or keeps itself when it is close to none; stored chains
                  it bridges take one key, the earliest's. Stored decisions do not move.
      re-curated  a text better than a stored keeper it is close to, or older than the chains it joins,
                  or any other case: with every row of the stored chains it touches, in one curate_table.
    Chains of changed or gone rows are re-curated too. So every dropped row stays a verified near
    duplicate of a better kept row, and near duplicates stay in one chain, as in a full run.
    """
    from distill_pipeline.stages.curated_examples import CurateResult, _decode_inputs, curate_table

    state = load_state(out_dir, cfg)
    if state is None or not previous_examples.is_file() or not previous_quarantine.is_file():
        return None
    started = time.perf_counter()
    ids = pc.cast(labels.column("id"), pa.string()).combine_chunks()
    if pc.count_distinct(ids).as_py() != len(ids):
        return None  # ids that repeat cannot be matched with the stored rows
    hashes = row_hashes(labels)
    old_ids = state.rows.column("id").combine_chunks()
    at = pc.index_in(ids, value_set=old_ids)
    found = at.is_valid().to_numpy(zero_copy_only=False)
    same = np.zeros(len(ids), bool)
    same[found] = state.rows.column("row_hash").to_numpy()[pc.drop_null(at).to_numpy()] == hashes[found]
    still = np.zeros(len(old_ids), bool)  # stored rows that are here, unchanged
    still[pc.drop_null(pc.filter(at, pa.array(same))).to_numpy()] = True
    limit = MAX_INCREMENTAL_SHARE * max(labels.num_rows, 1)
    if (~same).sum() > limit:
        return None

    old_clusters = state.rows.column("cluster_key").combine_chunks()
    redo = set(pc.drop_null(old_clusters.filter(pa.array(~still))).to_pylist())  # chains of changed/gone rows
    fresh = labels.filter(pa.array(~same))
    first = curate_table(fresh, cfg, state.confidence_filter)
    params = detector_params(cfg)
    first_sig = text_index.signatures(first.groups.column("text"), params)
    exact, pairs = _matches(state, first.groups, first_sig, cfg)

    # The stored texts and chains each new chain touches.
    stored, new = state.groups, first.groups
    stored_chain = stored.column("cluster_key").combine_chunks()
    new_chain = new.column("cluster_key").to_pylist()
    near_of: dict[int, list[int]] = {}
    for g, h in pairs:
        near_of.setdefault(int(g), []).append(int(h))
    members: dict[str, list[int]] = {}
    touched_texts: dict[str, set[int]] = {}
    for g, key in enumerate(new_chain):
        members.setdefault(key, []).append(g)
        texts = touched_texts.setdefault(key, set())
        texts.update(near_of.get(g, []))
        if exact[g] >= 0:
            texts.add(int(exact[g]))
    touches = {key: set(stored_chain.take(pa.array(sorted(t), pa.int64())).to_pylist())
               for key, t in touched_texts.items()}
    chains = set().union(*touches.values()) if touches else set()

    # The stored keepers a new text is judged against: the chains' leads and the keepers of its near texts.
    in_chains = pc.is_in(stored.column("cluster_key"), value_set=_keys(chains))
    keepers = stored.filter(pc.and_(in_chains, stored.column("is_keeper")))
    keeper_at = {kid: i for i, kid in enumerate(keepers.column("best_id").to_pylist())}
    leads_of: dict[str, list[int]] = {}
    for i, (c, lead) in enumerate(zip(keepers.column("cluster_key").to_pylist(), keepers.column("is_lead").to_pylist())):
        if lead:
            leads_of.setdefault(c, []).append(i)
    stored_keeper = stored.column("keeper_id").combine_chunks()
    judge: dict[int, set[int]] = {}
    for key, cs in touches.items():
        for g in members[key]:
            if exact[g] < 0 and cs:
                near_keepers = stored_keeper.take(pa.array(near_of.get(g, []), pa.int64())).to_pylist()
                judge[g] = {i for c in cs for i in leads_of.get(c, [])} | {keeper_at[k] for k in near_keepers}
    checks = [(g, k) for g, ks in judge.items() for k in sorted(ks)]
    close: dict[int, list[int]] = {}
    if checks:
        texts = pa.concat_arrays([new.column("text").combine_chunks(), keepers.column("text").combine_chunks()])
        local = np.array([(g, new.num_rows + k) for g, k in checks], np.int64)
        sim = dedup.exact_jaccard_pairs(texts, local, params.shingle_size, workers=params.workers)
        for (g, k), value in zip(checks, sim):
            if value >= params.threshold - 1e-12:
                close.setdefault(g, []).append(k)

    new_rank, stored_rank, keeper_rank = _Ranks(new), _Ranks(stored), _Ranks(keepers)
    keeper_id = keepers.column("best_id").to_pylist()
    chain_first = pc.index_in(_keys(chains), value_set=stored.column("text_key").combine_chunks()).to_pylist()
    age = dict(zip(sorted(chains), (stored_rank.first[i] for i in chain_first)))
    age.update({key: min(new_rank.first[g] for g in gs) for key, gs in members.items()})
    new_keeper_at = {kid: g for g, kid in enumerate(new.column("best_id").to_pylist())}
    new_keeper = new.column("keeper_id").to_pylist()

    # Each text of a touching new chain: a duplicate of a stored keeper, its own keeper, or left as the
    # new-rows run decided ("first"); a new chain with a text that outranks a stored keeper close to it
    # is curated again together with those keepers' clusters ("local", keeping the chain's key).
    decision: dict[int, tuple[str, str] | None | str] = {}
    local: dict[str, set[str]] = {}  # new chain -> stored keeper ids curated again with it
    again_keys: set[str] = set()  # new chains curated again with their whole stored chains
    relevant: dict[str, set[str]] = {}  # stored keepers a new chain's texts are close to
    for key, cs in touches.items():
        if not cs:
            continue
        near_keepers, redo_local = set(), False
        for g in members[key]:
            if exact[g] >= 0:
                h = int(exact[g])
                kid = stored_keeper[h].as_py()
                near_keepers.add(kid)
                if new_rank.first[g] < stored_rank.first[h]:
                    again_keys.add(key)  # the text's earliest row moves: redo the chain
                elif new_rank.best[g] < stored_rank.best[h]:
                    redo_local = True
                else:
                    decision[g] = (kid, "exact_duplicate" if stored.column("is_keeper")[h].as_py()
                                   else "near_duplicate")
            else:
                near_keepers.update(keeper_id[k] for k in close.get(g, []))
                if any(new_rank.best[g] < keeper_rank.best[k] for k in close.get(g, [])):
                    redo_local = True
                elif close.get(g):
                    decision[g] = (keeper_id[min(close[g], key=lambda k: keeper_rank.best[k])], "near_duplicate")
                else:
                    decision[g] = None if new.column("is_keeper")[g].as_py() else "first"
        relevant[key] = near_keepers
        # a duplicate of another new text stands only if that one keeps itself
        if any(decision.get(g) == "first" and decision.get(new_keeper_at[new_keeper[g]]) is not None
               for g in members[key]):
            redo_local = True
        if redo_local and key not in again_keys:
            local[key] = set(near_keepers)
    joining = {key: cs for key, cs in touches.items() if cs and key not in again_keys}
    while True:  # settle: what touches a chain redone whole is redone with it; what points at a keeper redone
        # locally is redone with it
        redo |= {c for key in again_keys for c in touches[key]}
        moved = {key for key in joining if touches[key] & redo} - again_keys
        again_keys |= moved
        for key in moved:
            joining.pop(key)
            local.pop(key, None)
        redone = set().union(*local.values()) if local else set()
        pulled = {key for key in joining if key not in local and relevant[key] & redone}
        for key in pulled:
            local[key] = set(relevant[key])
        if not moved and not pulled:
            break

    # Chains a joining chain bridges take the earliest's key.
    parent: dict[str, str] = {}
    def root(k: str) -> str:
        while k in parent:
            k = parent[k]
        return k
    def union(a: str, b: str) -> None:
        a, b = root(a), root(b)
        if a != b:
            early, late = (a, b) if age[a] <= age[b] else (b, a)
            parent[late] = early
    for key, cs in joining.items():
        for c in cs:
            union(key, c)

    # Re-curate: whole chains (changed or gone rows, older texts), then the local clusters.
    first_rows = first.dedup_rows
    row_chain = first_rows.column("cluster_key")
    def rows_of_chains(keys) -> pa.Array:
        return first_rows.column("id").filter(pc.is_in(row_chain, value_set=_keys(keys))).combine_chunks()
    redo_old = still & pc.is_in(old_clusters, value_set=_keys(redo)).fill_null(False).to_numpy(zero_copy_only=False)
    redone_keepers = set().union(*local.values()) if local else set()
    local_texts = stored.column("text_key").filter(pc.is_in(stored_keeper, value_set=_keys(redone_keepers)))
    local_old = still & ~redo_old & pc.is_in(state.rows.column("text_key"), value_set=local_texts) \
        .fill_null(False).to_numpy(zero_copy_only=False)
    redo_ids = pa.concat_arrays([rows_of_chains(again_keys), old_ids.filter(pa.array(redo_old))])
    local_ids = pa.concat_arrays([rows_of_chains(local), old_ids.filter(pa.array(local_old))])
    if len(redo_ids) + len(local_ids) > limit:
        return None
    redo_mask = pc.is_in(ids, value_set=redo_ids)
    local_mask = pc.is_in(ids, value_set=local_ids)
    again = curate_table(labels.filter(redo_mask), cfg, state.confidence_filter)
    nearby = curate_table(labels.filter(local_mask), cfg, state.confidence_filter)
    # local rows keep the key of the chain they are in; chains the re-curation joins become one
    chain_of_id = dict(zip(first_rows.column("id").to_pylist(), row_chain.to_pylist()))
    chain_of_id.update(zip(old_ids.filter(pa.array(local_old)).to_pylist(),
                           old_clusters.filter(pa.array(local_old)).to_pylist()))
    by_new_chain: dict[str, str] = {}
    for rid, c in zip(nearby.dedup_rows.column("id").to_pylist(), nearby.dedup_rows.column("cluster_key").to_pylist()):
        if c in by_new_chain:
            union(by_new_chain[c], chain_of_id[rid])
        else:
            by_new_chain[c] = chain_of_id[rid]
    rename = {k: root(k) for k in parent}
    stored_rename = {k: v for k, v in rename.items() if k in chains}
    def keyed(table: pa.Table) -> pa.Table:  # a local result row takes its chain's (final) key
        at = table.schema.get_field_index("cluster_key")
        keys = [None if c is None else rename.get(chain_of_id[rid], chain_of_id[rid])
                for rid, c in zip(table.column("id").to_pylist(), table.column(at).to_pylist())]
        return table.set_column(at, "cluster_key", pa.array(keys, pa.string()))

    # Joining rows decided as duplicates of a stored keeper.
    settled = {key: cs for key, cs in joining.items() if key not in local}
    joining_rows = first_rows.filter(pc.is_in(row_chain, value_set=_keys(settled)))
    group_at = dict(zip(new.column("text_key").to_pylist(), range(new.num_rows)))
    row_group = [group_at[t] for t in joining_rows.column("text_key").to_pylist()]
    as_dup = np.array([isinstance(decision[g], tuple) for g in row_group], bool)
    dup_rows = joining_rows.filter(pa.array(as_dup))
    dup_ids = dup_rows.column("id").combine_chunks()
    dup_decisions = [decision[g] for g, d in zip(row_group, as_dup) if d]
    dup_labels = labels.take(pc.index_in(dup_ids, value_set=ids))
    dup_inputs, _, _ = _decode_inputs(dup_labels.column("input"))
    dup_chain = [rename.get(k, k) for k in dup_rows.column("cluster_key").to_pylist()]
    n_dup = len(dup_ids)
    dup_quarantine = pa.table({
        "id": dup_ids, "input": dup_inputs, "input_raw": pa.nulls(n_dup, pa.binary()),
        "output": dup_labels.column("output").cast(pa.string()) if "output" in dup_labels.column_names
        else pa.nulls(n_dup, pa.string()),
        "confidence": dup_labels.column("confidence").cast(pa.float64()) if "confidence" in dup_labels.column_names
        else pa.nulls(n_dup, pa.float64()),
        "reason": pa.array([d[1] for d in dup_decisions], pa.string()),
        "detail": pa.array([f"duplicate of id {d[0]}" for d in dup_decisions], pa.string()),
        "cluster_key": pa.array(dup_chain, pa.string())}, schema=first.quarantine.schema)

    # Outputs: what is not re-decided stays; rows gone from the labels leave both tables.
    decided_again = pa.concat_arrays([rows_of_chains(again_keys | set(local)), dup_ids])
    replaced = pa.concat_arrays([redo_ids, local_ids, old_ids.filter(pa.array(~still))])
    old_examples = _renamed(_without(pq.read_table(previous_examples), replaced), stored_rename)
    new_examples = _renamed(_without(first.examples, decided_again), rename)
    # duplicates counts: stored keepers gain the rows decided as theirs; new keepers lose those
    gained = Counter(d[0] for d in dup_decisions)
    lost = Counter(new_keeper[g] for g, d in zip(row_group, as_dup) if d)
    def recount(table: pa.Table, delta: Counter, sign: int) -> pa.Table:
        if not delta or not table.num_rows:
            return table
        extra = np.array([delta.get(k, 0) for k in table.column("id").to_pylist()], np.int64)
        counts = table.column("duplicates").to_numpy(zero_copy_only=False) + sign * extra
        return table.set_column(table.schema.get_field_index("duplicates"), "duplicates", pa.array(counts, pa.int32()))
    schema = old_examples.schema
    examples = pa.concat_tables([recount(old_examples, gained, 1), recount(new_examples, lost, -1).cast(schema),
                                 keyed(nearby.examples).cast(schema), again.examples.cast(schema)])
    quarantine = pa.concat_tables([_renamed(_without(pq.read_table(previous_quarantine), replaced), stored_rename),
                                   _renamed(_without(first.quarantine, decided_again), rename), dup_quarantine,
                                   keyed(nearby.quarantine), again.quarantine])

    # The state: stored rows and texts not re-decided (renamed), then the new ones.
    dup_dedup = pa.table({"id": dup_ids, "text_key": dup_rows.column("text_key"),
                          "cluster_key": pa.array(dup_chain, pa.string())})
    first_kept = first_rows.filter(pc.invert(pc.is_in(first_rows.column("id"), value_set=decided_again)))
    decided = pa.concat_tables([_renamed(first_kept, rename), dup_dedup, keyed(nearby.dedup_rows),
                                again.dedup_rows])
    changed = np.asarray(~same | redo_mask.to_numpy(zero_copy_only=False) | local_mask.to_numpy(zero_copy_only=False))
    rows = pa.concat_tables([_renamed(state.rows.filter(pa.array(still & ~redo_old & ~local_old)), stored_rename),
                             state_rows(labels.filter(pa.array(changed)), hashes[changed], decided)])

    keep_stored = ~(pc.is_in(stored.column("cluster_key"), value_set=_keys(redo)).to_numpy(zero_copy_only=False)
                    | pc.is_in(stored_keeper, value_set=_keys(redone_keepers)).to_numpy(zero_copy_only=False))
    kept_new = pc.is_in(new.column("cluster_key"), value_set=_keys(set(members) - again_keys - set(local))) \
        .to_numpy(zero_copy_only=False)
    new_texts = np.flatnonzero(kept_new & (exact < 0))
    added = new.take(pa.array(new_texts, pa.int64()))
    joined = np.array([new_chain[g] in settled for g in new_texts], bool)
    as_dup_text = np.array([isinstance(decision.get(int(g)), tuple) for g in new_texts], bool)
    added = _renamed(added, rename) \
        .set_column(3, "keeper_id", pa.array([decision[int(g)][0] if d else kid for g, d, kid in
                                              zip(new_texts, as_dup_text, added.column("keeper_id").to_pylist())],
                                             pa.string())) \
        .set_column(4, "is_keeper", pa.array(np.asarray(added.column("is_keeper")) & ~as_dup_text)) \
        .set_column(5, "is_lead", pa.array(np.asarray(added.column("is_lead")) & ~joined))
    chain_of_text = dict(zip(nearby.dedup_rows.column("text_key").to_pylist(),
                             keyed(nearby.dedup_rows).column("cluster_key").to_pylist()))
    nearby_groups = nearby.groups.set_column(
        2, "cluster_key", pa.array([chain_of_text[t] for t in nearby.groups.column("text_key").to_pylist()],
                                   pa.string()))
    groups = pa.concat_tables([_renamed(stored.filter(pa.array(keep_stored)), stored_rename), added, nearby_groups,
                               again.groups])
    signatures = text_index.concat([state.signatures.take(np.flatnonzero(keep_stored)), first_sig.take(new_texts),
                                    text_index.signatures(nearby.groups.column("text"), params),
                                    text_index.signatures(again.groups.column("text"), params)])
    new_state = (rows, groups, signatures, state.confidence_filter)

    counts = counts_of(labels, examples, quarantine, state.confidence_filter)
    facts = {"mode": "incremental", "rows_new_or_changed": fresh.num_rows,
             "rows_gone": int((~still).sum() - (found & ~same).sum()),
             "chains_joined": len(settled), "clusters_recurated_locally": len(local), "chains_recurated": len(redo),
             "rows_recurated": len(redo_ids) + len(local_ids)}
    return CurateResult(examples, quarantine, counts, time.perf_counter() - started), facts, new_state
