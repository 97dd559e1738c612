"""curated_examples: bad rows quarantined with reasons, duplicates removed, skips kept."""

import json
from datetime import datetime, timedelta, timezone

import psycopg
import pyarrow as pa

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import load_config
from distill_pipeline.stages.curated_examples import curate_table, text_key
from distill_pipeline.stages.dedup import jaccard
from distill_pipeline.stages.source_rows import export_source_rows, read_source_rows

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
EVENT = json.dumps({"event_type": "layoffs", "subject": "Apex Inc.", "object": None, "magnitude_class": "major",
                    "timing": "definitive", "sentiment": "negative", "materiality": "material",
                    "event_date": "2026-02-27"})
SKIP = '{"skip": true}'
LONG_SENTENCE = "Apex Inc. announced on February 27, 2026 a reduction of approximately 1500 positions, or 9% of its workforce."


def table_of(rows):
    """rows: (id, input, output, confidence) -> a source_rows-shaped table, one minute apart."""
    return pa.table({
        "id": [r[0] for r in rows],
        "input": [r[1] for r in rows],
        "output": [r[2] for r in rows],
        "confidence": pa.array([r[3] for r in rows], pa.float64()),
        "prompt_version": ["v"] * len(rows),
        "created_at": pa.array([T0 + timedelta(minutes=i) for i in range(len(rows))], pa.timestamp("us", tz="UTC")),
    })


def reasons(result):
    q = result.quarantine
    return dict(zip(q.column("id").to_pylist(), q.column("reason").to_pylist()))


def test_bad_rows_from_postgres_are_quarantined_with_reasons(db_url, distill_home):
    megabyte = ("x" * 1023 + " ") * 1024
    rows = [
        (1, LONG_SENTENCE.encode(), EVENT, 9),
        (2, b"This Annual Report contains forward-looking statements about our liquidity.", SKIP, 10),
        (3, None, SKIP, 9),
        (4, b"   ", SKIP, 9),
        (5, b"The Company \xff\xfe sold its unit.", EVENT, 9),
        (6, megabyte.encode(), SKIP, 9),
        (7, b"Birch Corp. dismissed KPMG LLP as its auditor on May 2, 2025.", '{"event_type": "dismissed_aud', 9),
        (8, b"Cobalt Energy raised its dividend by 5% on June 1, 2025.", EVENT, 3),
        (9, b"Dover Holdings issued $400 million of 6.875% senior notes due 2031 on April 4, 2025.", None, 9),
        (10, "Компания объявила о сокращении 300 сотрудников.".encode(), SKIP, 9),
    ]
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE raw_events (id bigint, input_text bytea, teacher_output text, confidence real, "
                     "prompt_version text, created_at timestamptz NOT NULL)")
        with conn.cursor().copy("COPY raw_events FROM STDIN") as copy:
            for i, (rid, text, out, conf) in enumerate(rows):
                copy.write_row((rid, text, out, conf, "v", T0 + timedelta(minutes=i)))
    cfg = load_config(env={"DISTILL_HOME": str(distill_home), "DISTILL__SOURCE__TABLE": "raw_events",
                           "DISTILL__SOURCE__COLUMNS__INPUT": "input_text"})
    export_source_rows(Database(db_url), cfg.source, cfg.stage_dir("source_rows"))
    result = curate_table(read_source_rows(cfg), cfg)

    assert reasons(result) == {"3": "input_null", "4": "input_empty", "5": "input_not_utf8",
                               "6": "input_too_long", "7": "output_invalid", "8": "low_confidence",
                               "9": "output_invalid", "10": "language"}
    assert result.examples.column("id").to_pylist() == ["1", "2"]
    assert result.counts["rows_in"] == 10 == result.counts["kept"] + result.counts["quarantined"]
    q = {r["id"]: r for r in result.quarantine.to_pylist()}
    assert q["5"]["input_raw"] == b"The Company \xff\xfe sold its unit."  # nothing lost
    assert len(q["6"]["input"]) == len(megabyte) and "max_input_chars" in q["6"]["detail"]
    assert "not valid JSON" in q["7"]["detail"] and q["7"]["output"].startswith('{"event_type"')
    assert "NULL" in q["9"]["detail"] and "min_confidence" in q["8"]["detail"]
    assert result.examples.column("target").to_pylist()[1] == SKIP  # skip examples are kept


def test_duplicates_keep_the_highest_confidence_member():
    near = LONG_SENTENCE.replace("1500", "1600").replace(",", "", 1)
    rows = [
        (1, LONG_SENTENCE, EVENT, 8),
        (2, "  " + LONG_SENTENCE.upper() + " ", EVENT, 10),  # exact after normalization, better confidence
        (3, near, EVENT, 9),  # near duplicate
        (4, "Our results may fluctuate from quarter to quarter due to changes in interest rates.", SKIP, 9),
        (5, "Grant Thornton LLP was dismissed by Everest Foods Co. on July 9, 2025.", SKIP, 9),
    ]
    cfg = load_config(env={})
    result = curate_table(table_of(rows), cfg)
    assert result.examples.column("id").to_pylist() == ["2", "4", "5"]
    assert reasons(result) == {"1": "exact_duplicate", "3": "near_duplicate"}
    kept = result.examples.to_pylist()[0]
    assert kept["duplicates"] == 2
    assert kept["cluster_key"] == text_key(LONG_SENTENCE.lower())  # the earliest member names the cluster
    details = dict(zip(result.quarantine.column("id").to_pylist(), result.quarantine.column("detail").to_pylist()))
    assert details["1"] == details["3"] == "duplicate of id 2"


def test_cluster_key_is_stable_when_a_better_duplicate_arrives_later():
    cfg = load_config(env={})
    base = [(1, LONG_SENTENCE, EVENT, 8), (2, "Our results may fluctuate due to changes in interest rates.", SKIP, 9)]
    before = curate_table(table_of(base), cfg).examples
    after = curate_table(table_of(base + [(3, LONG_SENTENCE + " ", EVENT, 10)]), cfg).examples
    key_before = dict(zip(before.column("id").to_pylist(), before.column("cluster_key").to_pylist()))["1"]
    key_after = dict(zip(after.column("id").to_pylist(), after.column("cluster_key").to_pylist()))["3"]
    assert key_before == key_after


def test_unknown_confidence_passes_and_empty_input_table_works():
    cfg = load_config(env={})
    result = curate_table(table_of([(1, LONG_SENTENCE, EVENT, None)]), cfg)
    assert result.counts["kept"] == 1
    empty = curate_table(table_of([]), cfg)
    assert empty.examples.num_rows == 0 and empty.counts["rows_in"] == 0


def test_rows_the_teacher_could_not_label_are_quarantined_with_its_error():
    table = table_of([(1, LONG_SENTENCE, EVENT, 9), (2, "Another sentence about a merger.", None, None),
                      (3, "Third sentence, over budget.", None, None), (4, None, None, None)])
    table = table.append_column("status", pa.array(["ok", "failed", "over_budget", "invalid_input"]))
    table = table.append_column("error", pa.array([None, "gave up after 6 attempts: HTTP 500", "budget reached",
                                                   "input is NULL"]))
    result = curate_table(table, load_config(env={}))
    assert reasons(result) == {"2": "teacher_failed", "3": "teacher_over_budget", "4": "input_null"}
    details = dict(zip(result.quarantine.column("id").to_pylist(), result.quarantine.column("detail").to_pylist()))
    assert details["2"] == "gave up after 6 attempts: HTTP 500"


def test_a_chain_of_near_duplicates_drops_only_rows_close_to_the_keeper():
    a = ("apex holdings completed the acquisition of birch logistics for four hundred million dollars "
         "in cash and assumed debt of the seller")
    b = a.replace("apex", "zeta")
    c = b.replace("seller", "buyer")
    d = c.replace("cash", "kind")
    assert jaccard(a, d) < 0.8 <= min(jaccard(a, b), jaccard(b, c), jaccard(c, d), jaccard(a, c))
    result = curate_table(table_of([(1, a, EVENT, 10), (2, b, EVENT, 9), (3, c, EVENT, 9), (4, d, EVENT, 9)]),
                          load_config(env={}))
    assert reasons(result) == {"2": "near_duplicate", "3": "near_duplicate"}
    kept = {r["id"]: r for r in result.examples.to_pylist()}
    assert set(kept) == {"1", "4"}  # d is no near duplicate of a, only of its chain neighbours
    assert kept["1"]["cluster_key"] == kept["4"]["cluster_key"]  # one chain: one split, no leakage


def test_dropped_duplicates_carry_their_cluster_key():
    rows = [(1, LONG_SENTENCE, EVENT, 10), (2, LONG_SENTENCE + "  ", EVENT, 9),
            (3, LONG_SENTENCE.replace("1500", "1600"), EVENT, 9), (4, None, SKIP, 9)]
    result = curate_table(table_of(rows), load_config(env={}))
    keys = dict(zip(result.quarantine.column("id").to_pylist(), result.quarantine.column("cluster_key").to_pylist()))
    kept_key = result.examples.column("cluster_key").to_pylist()[0]
    assert keys == {"2": kept_key, "3": kept_key, "4": None}
