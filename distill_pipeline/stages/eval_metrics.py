"""The eval report's metrics: the student's answers on the test split against the teacher's.

`compute_metrics(task, predictions)` takes one row per test example (`id`, `input`, `target`: the teacher's
answer as curated, `label`: its stratum, `output`: the student's raw text) and returns `(metrics, failures)`:

metrics (JSON-ready, plain Python values; None where a figure is undefined, e.g. a precision with no
predicted positives)::

    {"task_kind": "extraction", "headline_metric": "field_agreement", "headline_value": 0.93,
     "higher_is_better": True, "headline_definition": "...", "rows": 120,
     "metric_groups": ["overall", "validity", "skip", "per_field_accuracy"],   # the order a report shows them
     "overall": {...}, "validity": {...}, ...,                                  # each group: name -> figure,
                                                                                # or name -> {column: figure}
     "definitions": {metric: one line},
     "slices": [{"label": ..., "rows": ..., "share": ..., <headline>: ..., ...}],  # per teacher label
     "confusion_matrix": {"teacher": [...], "student": [...], "counts": [[...]]},  # classification only
     "chrf_histogram": {"edges": [...], "counts": [...]}}                           # generation only

failures: a pandas DataFrame of the rows where the student disagrees with the teacher (`id`, `label`,
`input`, `teacher`, `student`, `detail`; regression adds `abs_error`, generation `chrf`), worst first where
there is an order.

The student's answer is parsed exactly as the teacher's was (`tasks.parse_output`): an answer the pipeline
would have rejected from the teacher is wrong, whatever part of it looks right.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from distill_pipeline.config import TaskConfig
from distill_pipeline.stages.task_schema import answer_schema
from distill_pipeline.stages.tasks import Parsed, _load_json, parse_output

REQUIRED_COLUMNS = ("id", "input", "target", "label", "output")
INVALID = "(invalid)"  # the confusion matrix's column for student answers that are not one of the labels
FAILURE_COLUMNS = ["id", "label", "input", "teacher", "student", "detail"]

FIELD_AGREEMENT = (
    "Field agreement: the share of (row, field) pairs where the student gives the teacher's value. Every test "
    "row counts once per configured field. On a row where the teacher extracted an event each field is "
    "compared on its own (exact value; a field both leave out agrees). On a row where the teacher or the "
    "student said skip, every field agrees when both said skip and none does otherwise, so a skip "
    "disagreement counts against every field. A student answer that does not parse as a valid answer (not "
    "JSON, a missing field, a value outside its enum or range) is wrong on every field. It is the mean of "
    "the per-field accuracies."
)
ACCURACY = ("Accuracy: the share of test rows where the student's label is the teacher's; an answer that is "
            "not one of the labels is wrong.")
MAE = ("Overall MAE: the mean absolute error over every scored (row, dimension) pair, in the fields' own "
       "units; lower is better. An answer that does not parse counts as the worst in-range answer on a "
       "dimension with a minimum and a maximum, and is left out (counted as unscored) on one without.")
CHRF = ("chrF: sacrebleu's corpus-level character n-gram F-score (0-100) of the student's texts against the "
        "teacher's; 100 for identical texts. An answer that does not parse (empty) scores as the empty text.")

DEFINITIONS = {
    "field_agreement": FIELD_AGREEMENT,
    "accuracy": ACCURACY,
    "mae": MAE,
    "chrf": CHRF,
    "exact_match": "Exact match: the share of rows where the student's parsed answer equals the teacher's.",
    "parse_ok_rate": "Parse rate: the share of student answers the pipeline would accept as a teacher answer.",
    "valid_json_rate": "Valid JSON: the share of student answers that load as JSON (a ``` fence allowed).",
    "schema_valid_rate": "Schema-valid: the share of student answers valid under the task's answer JSON Schema "
                         "(jsonschema, formats checked; extra keys fail it).",
    "skip": "Skip precision/recall/F1: positive = the teacher said skip; the student predicts skip only with a "
            "valid skip answer, so an unparseable answer on a skip row is a false negative.",
    "macro_f1": "Macro-F1: the unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes the "
                "teacher or the student used.",
    "rmse": "RMSE: the root of the mean squared error over the same pairs as MAE.",
    "rouge_l": "ROUGE-L: the mean per-row F-measure of the longest common subsequence of words (rouge-score, "
               "0-1, its default tokenizer: lower-cased letters and digits).",
}


def compute_metrics(task: TaskConfig, predictions: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics, failures) of the student's `output` against the teacher's `target`; see the module docstring."""
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
    if not len(predictions):
        raise ValueError("no predictions to evaluate (the test split is empty?)")
    df = predictions.reset_index(drop=True)
    outputs = [o if isinstance(o, str) else None for o in df["output"]]  # NaN/None: no answer
    teacher = [parse_output(task, t) for t in df["target"]]
    bad = [(str(i), p.error) for i, p in zip(df["id"], teacher) if not p.ok]
    if bad:  # curated targets always parse; one that does not means these are not this task's rows
        raise ValueError(f"{len(bad)} teacher target(s) do not parse under task.kind={task.kind}: ids "
                         f"{[i for i, _ in bad[:5]]} (first: {bad[0][1]})")
    student = [parse_output(task, o) for o in outputs]
    scorer = {"extraction": _extraction, "classification": _classification, "regression": _regression,
              "generation": _generation}[task.kind]
    rows = pd.DataFrame({
        "id": df["id"], "label": df["label"].astype(str), "input": df["input"].astype(str),
        "teacher": df["target"].astype(str), "student": [o if o is not None else "" for o in outputs],
        "parse_ok": [s.ok for s in student],
    })
    metrics, rows, slice_metric = scorer(task, rows, outputs, teacher, student)
    metrics = {"task_kind": task.kind, **metrics, "rows": len(rows)}
    metrics["headline_definition"] = DEFINITIONS[metrics["headline_metric"]]
    metrics["definitions"] = {k: v for k, v in DEFINITIONS.items() if _used(k, metrics)}
    metrics["slices"] = _slices(rows, metrics["headline_metric"], slice_metric, exact=task.kind != "classification")
    failures = rows.loc[~rows["exact"]]
    order = {"regression": ("abs_error", False), "generation": ("chrf", True)}.get(task.kind)
    if order:
        failures = failures.sort_values(order[0], ascending=order[1], kind="stable", na_position="first")
    extra = [c for c in ("abs_error", "chrf") if c in failures.columns]
    return _plain(metrics), failures[FAILURE_COLUMNS + extra].reset_index(drop=True)


def _used(key: str, metrics: dict[str, Any]) -> bool:
    groups = [metrics.get(g) for g in metrics["metric_groups"]]
    return key == metrics["headline_metric"] or any(isinstance(g, dict) and key in g for g in groups) \
        or key in metrics["metric_groups"]


# --- extraction -------------------------------------------------------------------------------------------

def _is_skip(task: TaskConfig, parsed: Parsed) -> bool:
    return bool(parsed.ok and task.skip_key and parsed.value == {task.skip_key: True})


def _student_error(parsed: Parsed) -> str:
    # parse_output words its errors for the teacher; here it is the student's answer
    return "does not parse: " + (parsed.error or "").replace("teacher output", "answer")


def _json_validity(task: TaskConfig, outputs: list[str | None]) -> tuple[list[bool], list[bool]]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(answer_schema(task), format_checker=Draft202012Validator.FORMAT_CHECKER)
    valid_json, schema_valid = [], []
    for out in outputs:
        # the same loader as parse_output (a fenced block is JSON too), so the rates nest
        loaded, error = _load_json(out) if out and out.strip() else (None, "empty")
        valid_json.append(error is None)
        schema_valid.append(error is None and validator.is_valid(loaded))
    return valid_json, schema_valid


def _extraction(task, rows, outputs, teacher, student):
    fields = list(task.fields)
    missing = object()
    agree = {f: [] for f in fields}
    details = []
    for t, s in zip(teacher, student):
        t_skip, s_skip = _is_skip(task, t), _is_skip(task, s)
        if not s.ok:
            same, detail = {f: False for f in fields}, _student_error(s)
        elif t_skip or s_skip:
            both = t_skip and s_skip
            same = {f: both for f in fields}
            detail = "" if both else ("student said skip, the teacher extracted an event" if s_skip
                                      else "teacher said skip, the student extracted an event")
        else:
            same = {f: t.value.get(f, missing) == s.value.get(f, missing) for f in fields}
            detail = "differs on: " + ", ".join(f for f in fields if not same[f])
        for f in fields:
            agree[f].append(same[f])
        details.append(detail)
    per_field = pd.DataFrame(agree)
    rows["row_agreement"] = per_field.mean(axis=1)
    rows["exact"] = [s.ok and s.value == t.value for t, s in zip(teacher, student)]
    rows["detail"] = details
    valid_json, schema_valid = _json_validity(task, outputs)
    field_agreement = float(per_field.to_numpy().mean())
    metrics = {
        "headline_metric": "field_agreement", "headline_value": field_agreement, "higher_is_better": True,
        "metric_groups": ["overall", "validity"] + (["skip"] if task.skip_key else []) + ["per_field_accuracy"],
        "overall": {"field_agreement": field_agreement, "exact_match": float(rows["exact"].mean()),
                    "event_rows": sum(not _is_skip(task, t) for t in teacher),
                    "skip_rows": sum(_is_skip(task, t) for t in teacher)},
        "validity": {"valid_json_rate": _mean(valid_json), "schema_valid_rate": _mean(schema_valid),
                     "parse_ok_rate": float(rows["parse_ok"].mean())},
        "per_field_accuracy": {f: float(per_field[f].mean()) for f in fields},
    }
    if task.skip_key:
        metrics["skip"] = _binary([_is_skip(task, t) for t in teacher], [_is_skip(task, s) for s in student])
    return metrics, rows, lambda sub: float(sub["row_agreement"].mean())


def _binary(truth: list[bool], predicted: list[bool]) -> dict[str, Any]:
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    return {"precision": precision, "recall": recall, "f1": f1, "teacher_skips": tp + fn,
            "student_skips": tp + fp, "true_positives": tp, "false_positives": fp, "false_negatives": fn}


# --- classification ---------------------------------------------------------------------------------------

def _classification(task, rows, outputs, teacher, student):
    labels = list(task.labels)
    truth = [t.value for t in teacher]
    pred = [s.value if s.ok else INVALID for s in student]
    columns = labels + [INVALID]
    counts = pd.DataFrame(0, index=labels, columns=columns)
    for t, p in zip(truth, pred):
        counts.loc[t, p] += 1
    per_class = {}
    for label in labels:
        tp = int(counts.loc[label, label])
        support, predicted = int(counts.loc[label].sum()), int(counts[label].sum())
        fp, fn = predicted - tp, support - tp
        per_class[label] = {"support": support, "predicted": predicted,
                            "precision": tp / predicted if predicted else None,
                            "recall": tp / support if support else None,
                            "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None}
    f1s = [c["f1"] for c in per_class.values() if c["f1"] is not None]  # classes neither side used: left out
    rows["exact"] = [t == p for t, p in zip(truth, pred)]
    rows["detail"] = [("" if ok else (_student_error(s) if not s.ok else f"student said {p!r}, teacher {t!r}"))
                      for ok, s, t, p in zip(rows["exact"], student, truth, pred)]
    accuracy = float(rows["exact"].mean())
    metrics = {
        "headline_metric": "accuracy", "headline_value": accuracy, "higher_is_better": True,
        "metric_groups": ["overall", "validity", "per_class"],
        "overall": {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else None},
        "validity": {"parse_ok_rate": float(rows["parse_ok"].mean())},
        "per_class": per_class,
        "confusion_matrix": {"teacher": labels, "student": columns, "counts": counts.to_numpy().tolist()},
    }
    return metrics, rows, lambda sub: float(sub["exact"].mean())


# --- regression -------------------------------------------------------------------------------------------

def _regression(task, rows, outputs, teacher, student):
    errors = {f: [] for f in task.fields}  # per dimension: abs error per row, None = unscored
    imputed = {f: 0 for f in task.fields}
    for t, s in zip(teacher, student):
        for name, spec in task.fields.items():
            want = t.value.get(name)
            got = s.value.get(name) if s.ok else None
            if want is None:  # nothing to measure against (a nullable dimension the teacher left empty)
                errors[name].append(None if got is not None or not s.ok else 0.0)
            elif got is not None:
                errors[name].append(abs(float(got) - float(want)))
            elif spec.minimum is not None and spec.maximum is not None:
                # no usable answer: no better than the farthest in-range one
                errors[name].append(max(abs(float(want) - spec.minimum), abs(spec.maximum - float(want))))
                imputed[name] += 1
            else:
                errors[name].append(None)
    err = pd.DataFrame(errors, dtype="float64")
    per_dim = {}
    for name in task.fields:
        col = err[name].dropna()
        per_dim[name] = {"mae": float(col.mean()) if len(col) else None,
                         "rmse": math.sqrt(float((col ** 2).mean())) if len(col) else None,
                         "scored": len(col), "worst_case_imputed": imputed[name],
                         "unscored": int(err[name].isna().sum())}
    pairs = pd.Series(err.to_numpy().ravel()).dropna()  # every scored (row, dimension) pair
    mae = float(pairs.mean()) if len(pairs) else None
    rmse = math.sqrt(float((pairs ** 2).mean())) if len(pairs) else None
    rows["err_sum"], rows["err_n"] = err.sum(axis=1, min_count=1).fillna(0.0), err.notna().sum(axis=1)
    rows["abs_error"] = err.mean(axis=1)
    rows["exact"] = [s.ok and s.value == t.value for t, s in zip(teacher, student)]
    rows["detail"] = [("" if ok else _student_error(s) if not s.ok else
                       "off by " + ", ".join(f"{n} {e:+g}" for n, e in _signed(t, s, task) if e)
                       or "a dimension is empty on one side")
                      for ok, t, s in zip(rows["exact"], teacher, student)]
    valid_json, schema_valid = _json_validity(task, outputs)
    metrics = {
        "headline_metric": "mae", "headline_value": mae, "higher_is_better": False,
        "metric_groups": ["overall", "validity", "per_dimension"],
        "overall": {"mae": mae, "rmse": rmse, "exact_match": float(rows["exact"].mean()),
                    "scored_pairs": len(pairs), "unscored_pairs": int(err.isna().to_numpy().sum())},
        "validity": {"valid_json_rate": _mean(valid_json), "schema_valid_rate": _mean(schema_valid),
                     "parse_ok_rate": float(rows["parse_ok"].mean())},
        "per_dimension": per_dim,
    }

    def slice_mae(sub: pd.DataFrame) -> float | None:
        n = int(sub["err_n"].sum())
        return float(sub["err_sum"].sum()) / n if n else None

    return metrics, rows, slice_mae


def _signed(t: Parsed, s: Parsed, task: TaskConfig) -> list[tuple[str, float]]:
    out = []
    for name in task.fields:
        a, b = t.value.get(name), s.value.get(name)
        if a is not None and b is not None:
            out.append((name, float(b) - float(a)))
    return out


# --- generation -------------------------------------------------------------------------------------------

def _generation(task, rows, outputs, teacher, student):
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    refs = [t.value for t in teacher]
    hyps = [s.value if s.ok else "" for s in student]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)]
    rows["chrf"] = [chrf.sentence_score(h, [r]).score for r, h in zip(refs, hyps)]
    rows["hyp"], rows["ref"] = hyps, refs
    rows["exact"] = [s.ok and s.value == t.value for t, s in zip(teacher, student)]
    rows["detail"] = [("" if ok else _student_error(s) if not s.ok else f"chrF {c:.1f}")
                      for ok, s, c in zip(rows["exact"], student, rows["chrf"])]
    corpus = float(chrf.corpus_score(hyps, [refs]).score)
    edges = list(range(0, 101, 10))
    hist = pd.cut(rows["chrf"], bins=edges, include_lowest=True).value_counts(sort=False)
    metrics = {
        "headline_metric": "chrf", "headline_value": corpus, "higher_is_better": True,
        "metric_groups": ["overall", "validity"],
        "overall": {"chrf": corpus, "rouge_l": sum(rouge) / len(rouge), "exact_match": float(rows["exact"].mean())},
        "validity": {"parse_ok_rate": float(rows["parse_ok"].mean())},
        "chrf_histogram": {"edges": edges, "counts": [int(c) for c in hist.tolist()]},
    }
    return metrics, rows, lambda sub: float(chrf.corpus_score(sub["hyp"].tolist(), [sub["ref"].tolist()]).score)


# --- shared -----------------------------------------------------------------------------------------------

def _slices(rows: pd.DataFrame, headline: str, metric: Callable[[pd.DataFrame], Any], exact: bool) -> list[dict]:
    out = []
    for label, sub in rows.groupby("label", sort=True):
        entry = {"label": label, "rows": len(sub), "share": len(sub) / len(rows), headline: metric(sub)}
        if exact:
            entry["exact_match"] = float(sub["exact"].mean())
        entry["parse_ok_rate"] = float(sub["parse_ok"].mean())
        out.append(entry)
    return out


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values)


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN/inf to None (json.dumps would write invalid NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
