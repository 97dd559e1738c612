"""The eval report's metrics on hand-built predictions with figures worked out by hand, and its HTML page."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from distill_pipeline.config import TaskConfig
from distill_pipeline.stages import eval_html
from distill_pipeline.stages.eval_metrics import INVALID, compute_metrics

EXTRACT = TaskConfig(kind="extraction", skip_key="skip", label_field="kind", fields={
    "kind": {"enum": ["buy", "sell"]}, "who": {"type": "string"}, "amount": {"type": "integer", "minimum": 0}})
BUY = {"kind": "buy", "who": "Apex", "amount": 5}
SELL = {"kind": "sell", "who": "Birch", "amount": 1}
SKIP = {"skip": True}


def frame(rows: list[tuple]) -> pd.DataFrame:
    """(teacher answer, teacher label, student raw text) per row -> the predictions frame."""
    return pd.DataFrame({
        "id": list(range(1, len(rows) + 1)),
        "input": [f"sentence {i}" for i in range(1, len(rows) + 1)],
        "target": [t if isinstance(t, str) else json.dumps(t) for t, _, _ in rows],
        "label": [label for _, label, _ in rows],
        "output": [s if s is None or isinstance(s, str) else json.dumps(s) for _, _, s in rows],
    })


EXTRACTION_ROWS = [
    (BUY, "buy", BUY),                                     # 1: 3/3 fields, exact
    (BUY, "buy", {**BUY, "who": "Apex Inc"}),              # 2: 2/3
    (BUY, "buy", SKIP),                                    # 3: student skip on an event: 0/3 (skip FP)
    (SKIP, "skip", SKIP),                                  # 4: both skip: 3/3, exact (skip TP)
    (SKIP, "skip", SELL),                                  # 5: student event on a skip row: 0/3 (skip FN)
    (SELL, "sell", '{"kind": "sell", "who": '),            # 6: not JSON: 0/3
    (SELL, "sell", {**SELL, "note": "extra"}),             # 7: extra key: parses (dropped), fails the schema; 3/3
    (SELL, "sell", {**SELL, "kind": "hold"}),              # 8: enum violation: does not parse, 0/3 though 2 match
]


def test_extraction_metrics_by_hand():
    m, failures = compute_metrics(EXTRACT, frame(EXTRACTION_ROWS))
    assert (m["task_kind"], m["headline_metric"], m["higher_is_better"]) == ("extraction", "field_agreement", True)
    # agreeing fields per row 3,2,0,3,0,0,3,0 of 8 rows x 3 fields
    assert m["headline_value"] == pytest.approx(11 / 24)
    assert m["overall"]["field_agreement"] == m["headline_value"]
    assert m["per_field_accuracy"] == pytest.approx({"kind": 4 / 8, "who": 3 / 8, "amount": 4 / 8})
    assert m["overall"]["exact_match"] == pytest.approx(3 / 8)  # rows 1, 4, 7
    assert (m["overall"]["event_rows"], m["overall"]["skip_rows"]) == (6, 2)
    # JSON fails only on row 6; the schema also rejects 7 (extra key) and 8 (enum); parsing rejects 6 and 8
    assert m["validity"] == pytest.approx({"valid_json_rate": 7 / 8, "schema_valid_rate": 5 / 8,
                                           "parse_ok_rate": 6 / 8})
    skip = m["skip"]
    assert (skip["true_positives"], skip["false_positives"], skip["false_negatives"]) == (1, 1, 1)
    assert (skip["precision"], skip["recall"], skip["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert "a skip disagreement counts against every field" in m["headline_definition"]
    slices = {s["label"]: s for s in m["slices"]}
    assert slices["buy"]["field_agreement"] == pytest.approx(5 / 9)
    assert slices["sell"]["field_agreement"] == pytest.approx(3 / 9)
    assert slices["skip"]["field_agreement"] == pytest.approx(3 / 6)
    assert (slices["buy"]["rows"], slices["skip"]["share"]) == (3, pytest.approx(2 / 8))

    assert failures["id"].tolist() == [2, 3, 5, 6, 8]
    detail = dict(zip(failures["id"], failures["detail"]))
    assert detail[2] == "differs on: who"
    assert "student said skip" in detail[3] and "teacher said skip" in detail[5]
    assert "not valid JSON" in detail[6] and "not one of" in detail[8]
    row6 = failures.set_index("id").loc[6]
    assert row6["student"] == '{"kind": "sell", "who": ' and json.loads(row6["teacher"]) == SELL
    json.dumps(m, allow_nan=False)  # the metrics are JSON as they are


def test_extraction_skip_undefined_and_missing_outputs():
    # no skip anywhere: skip precision/recall are undefined (None), not 0 or 1; a missing answer is wrong
    m, failures = compute_metrics(EXTRACT, frame([(BUY, "buy", BUY), (SELL, "sell", None)]))
    assert (m["skip"]["precision"], m["skip"]["recall"], m["skip"]["f1"]) == (None, None, None)
    assert m["headline_value"] == pytest.approx(0.5) and m["validity"]["valid_json_rate"] == 0.5
    assert failures["id"].tolist() == [2]


def test_a_teacher_target_that_does_not_parse_is_an_error():
    with pytest.raises(ValueError, match="do not parse"):
        compute_metrics(EXTRACT, frame([("not json", "buy", BUY)]))
    with pytest.raises(ValueError, match="lack column"):
        compute_metrics(EXTRACT, frame([(BUY, "buy", BUY)]).drop(columns="label"))


CLASSIFY = TaskConfig(kind="classification", labels=["billing", "bug", "other", "feature"])


def test_classification_confusion_and_macro_f1_by_hand():
    rows = [("billing", "billing", "billing"), ("billing", "billing", "bug"), ("billing", "billing", "refund"),
            ("bug", "bug", "bug"), ("bug", "bug", "billing"), ("other", "other", '{"label": "other"}')]
    m, failures = compute_metrics(CLASSIFY, frame(rows))
    assert (m["headline_metric"], m["higher_is_better"]) == ("accuracy", True)
    assert m["headline_value"] == pytest.approx(3 / 6)
    cm = m["confusion_matrix"]
    assert cm["teacher"] == ["billing", "bug", "other", "feature"]
    assert cm["student"] == ["billing", "bug", "other", "feature", INVALID]
    assert cm["counts"] == [[1, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    pc = m["per_class"]
    # billing: TP 1, predicted 2, support 3; bug: TP 1, predicted 2, support 2; other: 1/1/1
    assert (pc["billing"]["precision"], pc["billing"]["recall"], pc["billing"]["f1"]) == \
        pytest.approx((1 / 2, 1 / 3, 2 / 5))
    assert (pc["bug"]["precision"], pc["bug"]["recall"], pc["bug"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert pc["other"]["f1"] == 1.0
    # a class neither side used has no F1 and does not drag the macro average down
    assert (pc["feature"]["precision"], pc["feature"]["recall"], pc["feature"]["f1"]) == (None, None, None)
    assert m["overall"]["macro_f1"] == pytest.approx((2 / 5 + 1 / 2 + 1) / 3)
    assert m["validity"]["parse_ok_rate"] == pytest.approx(5 / 6)
    assert failures["id"].tolist() == [2, 3, 5]
    assert "does not parse" in failures.set_index("id").loc[3, "detail"]
    assert {s["label"]: s["accuracy"] for s in m["slices"]} == pytest.approx({"billing": 1 / 3, "bug": 1 / 2,
                                                                              "other": 1.0})


REGRESS = TaskConfig(kind="regression", fields={"quality": {"type": "number", "minimum": 0, "maximum": 10},
                                                "novelty": {"type": "integer"}})


def test_regression_mae_rmse_by_hand():
    rows = [({"quality": 7, "novelty": 3}, "quality=7", {"quality": 8, "novelty": 3}),   # errors 1, 0
            ({"quality": 2, "novelty": 5}, "quality=2", {"quality": 2, "novelty": 1}),   # errors 0, 4
            ({"quality": 9, "novelty": 2}, "quality=9", "{oops")]                        # 9 (worst in 0-10), unscored
    m, failures = compute_metrics(REGRESS, frame(rows))
    assert (m["headline_metric"], m["higher_is_better"]) == ("mae", False)
    assert m["headline_value"] == pytest.approx(14 / 5)
    assert m["overall"]["rmse"] == pytest.approx(math.sqrt(98 / 5))
    assert (m["overall"]["scored_pairs"], m["overall"]["unscored_pairs"]) == (5, 1)
    q, n = m["per_dimension"]["quality"], m["per_dimension"]["novelty"]
    assert (q["mae"], q["rmse"], q["worst_case_imputed"]) == \
        (pytest.approx(10 / 3), pytest.approx(math.sqrt(82 / 3)), 1)
    assert (n["mae"], n["rmse"], n["scored"], n["unscored"]) == (pytest.approx(2), pytest.approx(math.sqrt(8)), 2, 1)
    assert m["overall"]["exact_match"] == 0
    # worst first: row 3 (9), row 2 (mean of 0 and 4), row 1 (mean of 1 and 0)
    assert failures["id"].tolist() == [3, 2, 1]
    assert failures["abs_error"].tolist() == pytest.approx([9, 2, 0.5])
    assert failures.loc[1, "detail"] == "off by novelty -4"
    assert {s["label"]: s["mae"] for s in m["slices"]} == pytest.approx({"quality=2": 2, "quality=7": 0.5,
                                                                         "quality=9": 9})


GENERATE = TaskConfig(kind="generation")


def test_generation_exact_match_and_direction():
    same = ["The cat sat on the mat.", "Quarterly revenue grew by ten percent."]
    m_same, f_same = compute_metrics(GENERATE, frame([(t, "all", t) for t in same]))
    assert (m_same["headline_metric"], m_same["higher_is_better"]) == ("chrf", True)
    assert m_same["headline_value"] == pytest.approx(100.0)
    assert m_same["overall"]["rouge_l"] == pytest.approx(1.0) and m_same["overall"]["exact_match"] == 1.0
    assert f_same.empty

    unrelated = frame([(same[0], "all", "zzz qqq xxx"), (same[1], "all", "")])  # "" does not parse: scores as empty
    m_bad, f_bad = compute_metrics(GENERATE, unrelated)
    assert m_bad["headline_value"] < 10 and m_bad["overall"]["rouge_l"] == 0.0
    assert m_bad["overall"]["exact_match"] == 0.0 and m_bad["validity"]["parse_ok_rate"] == 0.5
    assert len(f_bad) == 2

    close = frame([(same[0], "all", "The cat sat on a mat."), (same[1], "all", "zzz qqq xxx")])
    m_mid, f_mid = compute_metrics(GENERATE, close)
    assert m_bad["headline_value"] < m_mid["headline_value"] < m_same["headline_value"]
    assert f_mid["id"].tolist() == [2, 1]  # lowest chrF first
    assert sum(m_mid["chrf_histogram"]["counts"]) == 2


def test_rouge_l_by_hand():
    # LCS of "the cat sat down" and "the dog sat down quietly" is "the sat down": P 3/5, R 3/4
    m, _ = compute_metrics(GENERATE, frame([("the cat sat down", "all", "the dog sat down quietly")]))
    assert m["overall"]["rouge_l"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))


# --- the page ---------------------------------------------------------------------------------------------

LOSS = {"train": [(4 * i, 2.5 / (1 + 0.3 * i)) for i in range(1, 13)], "val": [(0, 2.6), (24, 1.2), (48, 0.9)]}
LATENCY = {"student": {"input_tokens": 62.0, "output_tokens": 41.5, "p50_s": 0.21, "p95_s": 0.34,
                       "batched_tokens_per_s": 1450.0, "cost_per_1m_requests_usd": 3.1},
           "teacher": {"input_tokens": 410.0, "output_tokens": 60.0, "p50_s": 1.9, "cost_per_1m_requests_usd": 159.0,
                       "source": "recorded usage of 8 teacher answers"}}


def full_report(metrics: dict, failures: pd.DataFrame, passed: bool = False) -> dict:
    """A report shaped like eval_report.build_eval_report's."""
    gate = {"passed": passed, "headline_metric": metrics["headline_metric"],
            "headline_value": metrics["headline_value"], "higher_is_better": metrics["higher_is_better"],
            "threshold": 0.95, "champion_value": None, "champion_version": None,
            "reasons": [] if passed else
            [f"{metrics['headline_metric']} {metrics['headline_value']:.4f} < eval.min_headline 0.95"]}
    return {"task_kind": metrics["task_kind"], "headline_metric": metrics["headline_metric"],
            "headline_value": metrics["headline_value"], "gate_passed": passed, "prompt_version": "v1",
            "gate": gate, "metrics": metrics, "unconstrained": None, "latency_and_cost": LATENCY,
            "training": {"final_train_loss": 0.8, "best_val_loss": 0.9}, "rows": metrics["rows"],
            "failures": len(failures)}


def images(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_page_is_self_contained_and_escaped(tmp_path):
    rows = EXTRACTION_ROWS + [(BUY, "buy", {**BUY, "who": "<script>alert(1)</script> & co"})]
    metrics, failures = compute_metrics(EXTRACT, frame(rows))
    report = full_report(metrics, failures)
    page = eval_html.render_report(report, loss_curves=LOSS, latency=LATENCY, slices=metrics["slices"],
                                   failures=failures)
    html_path, json_path = eval_html.write_report(tmp_path / "out", report, page)
    text = html_path.read_text()
    assert text == page
    assert "http://" not in text and "https://" not in text  # no link of any kind, not even to matplotlib
    assert not re.search(r"<(link|script)\b|@import|url\(", text, re.IGNORECASE)
    srcs = images(text)
    assert len(srcs) == 3  # loss curves, per-field accuracy, latency
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text
    assert "<script>alert" not in text
    for shown in ("field agreement", "FAILED", "eval.min_headline 0.95", "per field accuracy", "teacher ÷ student",
                  "recorded usage of 8 teacher answers", "differs on: who", "Per label"):
        assert shown in text, shown
    # the serving table's ratio: teacher cost / student cost
    cost_row = re.search(r"cost per 1M requests \(USD\)</th>(.*?)</tr>", text, re.DOTALL).group(1)
    assert re.findall(r">([^<>]+)</td>", cost_row) == ["3.1000", "159", f"{159.0 / 3.1:.2f}"]

    # the stage keeps every failure as Parquet next to the page
    failures.to_parquet(tmp_path / "failures.parquet", index=False)
    assert pd.read_parquet(tmp_path / "failures.parquet")["id"].tolist() == failures["id"].tolist()

    data = json.loads(json_path.read_text())
    assert list(data)[:4] == ["task_kind", "headline_metric", "headline_value", "gate_passed"]
    assert (data["task_kind"], data["headline_metric"], data["gate_passed"]) == ("extraction", "field_agreement", False)
    assert data["metrics"]["per_field_accuracy"] == pytest.approx(metrics["per_field_accuracy"])


@pytest.mark.parametrize("task, rows, shown", [
    (CLASSIFY, [("billing", "billing", "bug"), ("bug", "bug", "bug")], "confusion matrix"),
    (REGRESS, [({"quality": 7, "novelty": 3}, "quality=7", {"quality": 8, "novelty": 1})], "per dimension"),
    (GENERATE, [("a b c", "all", "a b d")], "per-row chrf"),
])
def test_each_kind_gets_its_plot_and_a_bare_metrics_dict_renders(task, rows, shown):
    metrics, failures = compute_metrics(task, frame(rows))
    page = eval_html.render_report(metrics, loss_curves=None, latency=None, slices=None, failures=failures)
    assert len(images(page)) == 1 and images(page)[0].startswith("data:image/png;base64,")
    alts = re.findall(r"<img\b[^>]*\balt=\"([^\"]*)\"", page)
    assert "not evaluated" in page and len(alts) == 1 and shown in alts[0].lower()
    assert ("lower is better" in page) == (task.kind == "regression")


def test_write_report_without_a_gate(tmp_path):
    metrics, _ = compute_metrics(CLASSIFY, frame([("bug", "bug", "bug")]))
    _, json_path = eval_html.write_report(tmp_path, metrics, "<html></html>")
    data = json.loads(json_path.read_text())
    assert list(data)[:4] == ["task_kind", "headline_metric", "headline_value", "gate_passed"]
    assert data["gate_passed"] is None and data["headline_value"] == 1.0


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    metrics, failures = compute_metrics(EXTRACT, frame(EXTRACTION_ROWS))
    page = eval_html.render_report(full_report(metrics, failures), loss_curves=LOSS, latency=LATENCY,
                                   slices=metrics["slices"], failures=failures)
    html_path, _ = eval_html.write_report(tmp_path / "report", full_report(metrics, failures), page)
    shot = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    # a fresh profile and no background traffic: the page must render from the file alone
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--screenshot={shot}", "--window-size=1280,2000", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        rgb = img.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 50  # text, tables and plots, not a blank or single-colour page
        # the plots were decoded: a good share of the page differs from the background
        background = max(colours)[1]
        assert sum(n for n, c in colours if c != background) > 0.05 * 1280 * 2000
