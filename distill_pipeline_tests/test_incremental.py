"""A night with few new rows: curation and splits judge only what changed, and come out as a full run would."""

import json
import random
import shutil
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.config import load_config
from distill_pipeline.demo.data import generate_rows, source_table
from distill_pipeline.stages.checks import check_leakage
from distill_pipeline.stages.curated_examples import build_curated_examples, curate_table, normalize
from distill_pipeline.stages.dataset_splits import ASSIGNMENTS, load_assignments, read_splits, write_splits
from distill_pipeline.stages.dedup import jaccard
from distill_pipeline.stages.teacher_labels import labels_path

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
SKIP = '{"skip": true}'
WORDS = ("acquire bond cash debt equity fund grant hedge index lease merger note option profit quota rate "
         "share stock tax unit vote warrant yield zone audit board claim deal exit filing growth loss").split()


def text(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.sample(WORDS, 12)) + f" {i}"


def labels(rows) -> pa.Table:
    """rows: (id, input, confidence[, output]) -> a teacher_labels-shaped table, one minute apart by id."""
    return pa.table({
        "id": [str(r[0]) for r in rows], "input": [r[1] for r in rows],
        "output": [r[3] if len(r) > 3 else SKIP for r in rows],
        "confidence": pa.array([r[2] for r in rows], pa.float64()),
        "created_at": pa.array([T0 + timedelta(minutes=r[0]) for r in rows], pa.timestamp("us", tz="UTC")),
        "status": ["ok"] * len(rows),
    })


def night(cfg, table: pa.Table):
    path = labels_path(cfg, "v1")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return build_curated_examples(cfg, "v1")


def as_sets(result):
    ex = result.examples
    q = result.quarantine
    return (sorted(zip(*[ex.column(c).to_pylist() for c in ("id", "cluster_key", "target", "duplicates")])),
            sorted(zip(*[q.column(c).to_pylist() for c in ("id", "reason", "detail", "cluster_key")])))


def test_a_night_of_new_rows_is_curated_as_a_full_run_would(distill_home):
    cfg = load_config(env={"DISTILL_HOME": str(distill_home)})
    base = [(i, text(i), 8.0) for i in range(1, 301)]
    # old clusters: 5 keeps 6 (exact), 7 keeps 8 (near), 9 is kept and will be gone with its duplicate 10 left
    base[5] = (6, base[4][1], 7.5)
    base[7] = (8, base[6][1] + " x", 7.5)
    base[9] = (10, base[8][1].upper(), 7.9)
    bridge_a, bridge_b = text(1000) + " abc def ghi jkl", text(1000) + " mno pqr stu vwx"
    assert jaccard(bridge_a.lower(), bridge_b.lower()) < 0.8 <= jaccard(text(1000), bridge_a)
    assert jaccard(text(1000), bridge_b) >= 0.8
    base += [(301, bridge_a, 8.0), (302, bridge_b, 8.0)]
    first, manifest = night(cfg, labels(base))
    assert manifest["mode"] == "full" and first.counts["dropped_exact_duplicate"] == 2

    rows = [r for r in base if r[0] != 9]  # gone
    rows[1] = (2, text(2), 8.0, '{"event_type": "broken')  # changed: now invalid
    rows += [
        (401, text(11), 7.0),  # exact duplicate of 11, worse: a duplicate of it
        (402, text(12).upper(), 9.5),  # exact duplicate of 12, better: keeps, 12 dropped
        (403, text(13) + " y", 7.0),  # near duplicate of 13, worse
        (404, text(14) + " y", 9.5),  # near duplicate of 14, better
        (405, text(500), 8.0),  # new text
        (406, "   ", 8.0),  # empty input
        (407, text(1000), 8.0),  # bridges 301 and 302: one cluster now
        (408, text(600), 8.0), (409, text(600) + " z", 7.0),  # a new cluster of two
    ]
    table = labels(rows)
    second, manifest = night(cfg, table)
    assert manifest["mode"] == "incremental"
    assert manifest["rows_new_or_changed"] == 10 and manifest["rows_gone"] == 1
    assert manifest["rows_recurated"] < 30  # only the clusters touched, not the 300 rows
    assert as_sets(second) == as_sets(curate_table(table, cfg))
    assert {k: v for k, v in second.counts.items()} == curate_table(table, cfg).counts
    keys = dict(zip(second.examples.column("id").to_pylist(), second.examples.column("cluster_key").to_pylist()))
    reasons = dict(zip(second.quarantine.column("id").to_pylist(), second.quarantine.column("reason").to_pylist()))
    assert reasons["12"] == "exact_duplicate" and reasons["14"] == "near_duplicate" and reasons["401"] == "exact_duplicate"
    assert reasons["2"] == "output_invalid" and reasons["406"] == "input_empty" and "9" not in keys and "10" in keys
    q_keys = dict(zip(second.quarantine.column("id").to_pylist(), second.quarantine.column("cluster_key").to_pylist()))
    assert keys["301"] == keys["302"] == q_keys["407"] and reasons["407"] == "near_duplicate"

    # a night with nothing new changes nothing
    third, manifest = night(cfg, table)
    assert manifest["mode"] == "incremental" and manifest["rows_recurated"] == 0
    assert as_sets(third) == as_sets(second)


def rank(confidence: float, created, rid: str):
    return (-confidence, created, rid)


def test_incremental_curation_keeps_every_guarantee_on_templated_data(distill_home):
    """On the demo generator's boilerplate (huge LSH buckets) an incremental night may pick other keepers
    than a full run would; what must hold is checked here, from the rows themselves."""
    cfg = load_config(env={"DISTILL_HOME": str(distill_home)})
    old = source_table(list(generate_rows(2000, seed=5)))
    new = source_table(list(generate_rows(60, seed=99)), first_id=10_000)
    night(cfg, old)
    table = pa.concat_tables([old, new])
    result, manifest = night(cfg, table)
    assert manifest["mode"] == "incremental"
    full = curate_table(table, cfg)

    ex, q = result.examples, result.quarantine
    ids = ex.column("id").to_pylist() + q.column("id").to_pylist()
    assert sorted(ids) == sorted(str(i) for i in table.column("id").to_pylist())  # every row once
    # rows dropped for anything but duplication: as in a full run
    def other_reasons(t):
        return sorted((i, r) for i, r in zip(t.column("id").to_pylist(), t.column("reason").to_pylist())
                      if not r.endswith("_duplicate"))
    assert other_reasons(q) == other_reasons(full.quarantine)
    rows = {str(r["id"]): r for r in table.to_pylist()}
    kept = dict(zip(ex.column("id").to_pylist(), ex.column("cluster_key").to_pylist()))
    texts = {i: normalize(pa.array([rows[i]["input"]], pa.string()))[0].as_py() for i in ids}
    assert len({texts[i] for i in kept}) == len(kept)  # no two examples share a text
    pointed = {}
    for rid, reason, detail, key in zip(*[q.column(c).to_pylist() for c in ("id", "reason", "detail", "cluster_key")]):
        if not reason.endswith("_duplicate"):
            continue
        keeper = detail.removeprefix("duplicate of id ")
        pointed[keeper] = pointed.get(keeper, 0) + 1
        assert keeper in kept and key == kept[keeper]
        a, b = rows[keeper], rows[rid]
        assert rank(a["confidence"], a["created_at"], keeper) < rank(b["confidence"], b["created_at"], rid)
        assert jaccard(texts[keeper], texts[rid]) >= cfg.curate.near_duplicate_threshold - 1e-12
    assert pointed == {i: d for i, d in zip(ex.column("id").to_pylist(), ex.column("duplicates").to_pylist()) if d}
    # and the run is close to a full one
    assert abs(result.counts["kept"] - full.counts["kept"]) <= 0.01 * full.counts["kept"]


def test_incremental_splits_match_a_full_pass_and_do_not_leak(distill_home, tmp_path):
    cfg = load_config(env={"DISTILL_HOME": str(distill_home)})
    old = source_table(list(generate_rows(2000, seed=5)))
    new = source_table(list(generate_rows(60, seed=99)), first_id=10_000)
    before, _ = night(cfg, old)
    after, _ = night(cfg, pa.concat_tables([old, new]))
    here, fresh = tmp_path / "incremental", tmp_path / "full"
    assert write_splits(before.examples, cfg.split, here, "v1", curate=cfg.curate)["mode"] == "full"
    fresh.mkdir()
    shutil.copy(here / ASSIGNMENTS, fresh / ASSIGNMENTS)  # the same previous assignments
    incremental = write_splits(after.examples, cfg.split, here, "v1", curate=cfg.curate)
    full = write_splits(after.examples, cfg.split, fresh, "v1", curate=cfg.curate)
    assert incremental["mode"] == "incremental" and full["mode"] == "full"
    assert load_assignments(here) == load_assignments(fresh)
    assert incremental["clusters_merged_for_leakage"] == full["clusters_merged_for_leakage"]
    ok, leak = check_leakage(read_splits(here), cfg.curate.near_duplicate_threshold, cfg.curate.shingle_size)
    assert ok, leak
    again = write_splits(after.examples, cfg.split, here, "v1", curate=cfg.curate)
    assert again["mode"] == "incremental" and again["pairs_checked"] == 0
    assert again["splits"] == incremental["splits"]


def test_changed_settings_or_a_lost_state_mean_a_full_run(distill_home):
    cfg = load_config(env={"DISTILL_HOME": str(distill_home)})
    table = labels([(i, text(i), 8.0) for i in range(1, 50)])
    assert night(cfg, table)[1]["mode"] == "full"
    assert night(cfg, table)[1]["mode"] == "incremental"
    stricter = load_config(env={"DISTILL_HOME": str(distill_home), "DISTILL__CURATE__NEAR_DUPLICATE_THRESHOLD": "0.9"})
    assert night(stricter, table)[1]["mode"] == "full"
    state = cfg.stage_dir("curated_examples", "v1") / "state" / "settings.json"
    state.unlink()  # as after a crash between writing the outputs and the state
    assert night(stricter, table)[1]["mode"] == "full"
    off = load_config(env={"DISTILL_HOME": str(distill_home), "DISTILL__CURATE__INCREMENTAL": "false"})
    assert night(off, table)[1]["mode"] == "full"
    assert json.loads(state.read_text())["confidence_scale"] == "0-10"
