"""The eval report as ONE self-contained HTML page, and its JSON twin.

Self-contained means the page loads nothing: the CSS is inline, every plot is a base64 PNG drawn with
matplotlib's Agg canvas (a `Figure` of its own, so pyplot's global backend and state are never touched), no
font, script or link is fetched. Every text that comes from data (inputs, answers, labels) is HTML-escaped.

`render_report(report, ...)` reads the report `eval_report.build_eval_report` assembles; a bare
`eval_metrics.compute_metrics` dict works too (then it is the metrics and there is no gate):

    {"task_kind", "headline_metric", "headline_value", "gate_passed", "prompt_version",
     "gate": {"passed", "threshold", "champion_value", "reasons", ...},
     "metrics": <compute_metrics dict>, "unconstrained": <compute_metrics dict> | None,
     "training": {"final_train_loss", "best_val_loss", ...}, "rows", "failures"}

loss_curves: {"train": [(step, loss), ...], "val": [...]}. latency: {"student": {...}, "teacher": {...}} with
input_tokens, output_tokens, p50_s, p95_s, batched_tokens_per_s, cost_per_1m_requests_usd (any may be missing).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import math
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd

HTML_NAME = "eval_report.html"
JSON_NAME = "eval_report.json"
FAILURE_SAMPLE = 25
TEXT_CHARS = 360  # a failure's texts are cut to this in the page (the failures file keeps them whole)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d2430; background: #f5f6f8; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 28px 0 10px; }
h3 { font-size: 15px; margin: 16px 0 6px; color: #3b4656; }
.meta { color: #5b6675; font-size: 13px; }
.card p { font-size: 14px; line-height: 1.4; color: #3b4656; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; margin-top: 16px; }
.card { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 14px 18px; flex: 1 1 320px; }
.big { font-size: 34px; font-weight: 600; }
.pass { color: #137333; } .fail { color: #b3261e; } .none { color: #5b6675; }
.badge { display: inline-block; padding: 3px 10px; border-radius: 12px; font-weight: 600; font-size: 14px; }
.badge.pass { background: #e6f4ea; } .badge.fail { background: #fce8e6; } .badge.none { background: #eceff3; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.grid > div { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 10px 14px; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
td.num, td.col_heading { font-variant-numeric: tabular-nums; }
table.failures td { max-width: 330px; word-wrap: break-word; overflow-wrap: anywhere; white-space: pre-wrap;
                    font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
img.plot { max-width: 100%; background: #fff; border: 1px solid #dde1e7; border-radius: 8px; }
dl { font-size: 13px; } dt { font-weight: 600; margin-top: 6px; } dd { margin-left: 16px; color: #3b4656; }
ul.reasons { margin: 6px 0 8px 18px; padding: 0; font-size: 14px; }
"""


def render_report(report: dict[str, Any], *, loss_curves: dict[str, Any] | None = None,
                  latency: dict[str, Any] | None = None, slices: Any = None, failures: Any = None) -> str:
    """The whole page as one string; see the module docstring for what each argument holds."""
    metrics = report.get("metrics") or report
    kind = report.get("task_kind") or metrics.get("task_kind", "?")
    if slices is None:
        slices = metrics.get("slices")
    parts = [_header(report, metrics, kind), _definitions(metrics)]
    parts.append("<h2>Metrics</h2>" + _groups(metrics))
    if report.get("unconstrained"):
        parts.append(_unconstrained(metrics, report["unconstrained"]))
    if slices is not None and len(slices):
        parts.append("<h2>Per label (the teacher's stratum)</h2>"
                     + _table(pd.DataFrame(list(slices) if not isinstance(slices, pd.DataFrame) else slices),
                              "slices", index=False))
    parts.append(_plots(metrics, kind, loss_curves, latency, report.get("training")))
    if latency:
        parts.append("<h2>Serving: student vs teacher</h2>" + _serving(latency))
    if failures is not None:
        parts.append(_failures(failures))
    title = f"Eval report: {kind}" + (f" ({report['prompt_version']})" if report.get("prompt_version") else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>\n"
            + "\n".join(p for p in parts if p) + "\n</main></body></html>\n")


def write_report(out_dir: str | os.PathLike, report: dict[str, Any], html: str) -> tuple[Path, Path]:
    """Write eval_report.html and eval_report.json into out_dir; returns (html_path, json_path).

    The JSON leads with task_kind, headline_metric, headline_value and gate_passed (None when no gate ran),
    then the rest of the report as given. Both files are replaced atomically (a reader never sees half a file).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = report.get("metrics") or report
    gate = report.get("gate") or {}
    head = {
        "task_kind": report.get("task_kind", metrics.get("task_kind")),
        "headline_metric": report.get("headline_metric", metrics.get("headline_metric")),
        "headline_value": report.get("headline_value", metrics.get("headline_value")),
        "gate_passed": report.get("gate_passed", gate.get("passed")),
    }
    data = {**head, **{k: v for k, v in report.items() if k not in head}}
    html_path, json_path = out / HTML_NAME, out / JSON_NAME
    _atomic_write(html_path, html)
    _atomic_write(json_path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    return html_path, json_path


# --- sections ---------------------------------------------------------------------------------------------

def _header(report: dict, metrics: dict, kind: str) -> str:
    name = metrics.get("headline_metric", "?")
    value = report.get("headline_value", metrics.get("headline_value"))
    higher = metrics.get("higher_is_better", True)
    meta = [f"task kind <b>{_esc(kind)}</b>", f"{_esc(metrics.get('rows', report.get('rows', '?')))} test rows"]
    if report.get("prompt_version"):
        meta.append(f"prompt version <b>{_esc(report['prompt_version'])}</b>")
    if report.get("failures") is not None:
        meta.append(f"{_esc(report['failures'])} rows where the student disagrees")
    headline = (f"<div class=\"card\"><div class=\"meta\">Headline: {_esc(name.replace('_', ' '))} "
                f"({'higher' if higher else 'lower'} is better)</div>"
                f"<div class=\"big\">{_esc(_fmt(value))}</div>"
                f"<p>{_esc(metrics.get('headline_definition', ''))}</p></div>")
    return (f"<h1>Student vs teacher on the test split</h1><div class=\"meta\">{' · '.join(meta)}</div>"
            f"<div class=\"cards\">{headline}{_gate(report)}</div>")


def _gate(report: dict) -> str:
    gate = report.get("gate")
    passed = report.get("gate_passed", gate.get("passed") if gate else None)
    if passed is None:
        return ("<div class=\"card\"><div class=\"meta\">Gate</div>"
                "<span class=\"badge none\">not evaluated</span></div>")
    cls, word = ("pass", "PASSED: may be promoted") if passed else ("fail", "FAILED: not promoted")
    figures = {k: v for k, v in (gate or {}).items()
               if k not in ("passed", "reasons") and not isinstance(v, (dict, list))}
    table = _table(_column(figures), "gate") if figures else ""
    reasons = (gate or {}).get("reasons") or []
    why = ("<ul class=\"reasons\">" + "".join(f"<li>{_esc(r)}</li>" for r in reasons) + "</ul>") if reasons else \
        ("<p>The headline reaches the bar and is no worse than the champion's.</p>" if passed else "")
    return (f"<div class=\"card\"><div class=\"meta\">Gate</div><span class=\"badge {cls}\">{word}</span>"
            f"{why}{table}</div>")


def _definitions(metrics: dict) -> str:
    defs = metrics.get("definitions") or {}
    if not defs:
        return ""
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in defs.items())
    return f"<details><summary>What the metrics mean</summary><dl>{items}</dl></details>"


def _groups(metrics: dict) -> str:
    cells = []
    for group in metrics.get("metric_groups") or []:
        data = metrics.get(group)
        if not isinstance(data, dict) or not data:
            continue
        if all(isinstance(v, dict) for v in data.values()):  # name -> {column: figure}: one row per name
            frame = pd.DataFrame.from_dict(data, orient="index")
        else:
            frame = _column(data)
        cells.append(f"<div><h3>{_esc(group.replace('_', ' '))}</h3>{_table(frame, group)}</div>")
    return f"<div class=\"grid\">{''.join(cells)}</div>"


def _unconstrained(constrained: dict, free: dict) -> str:
    rows = {"rows": (constrained.get("rows"), free.get("rows")),
            constrained.get("headline_metric", "headline"): (constrained.get("headline_value"),
                                                             free.get("headline_value"))}
    for group in ("validity", "overall"):
        for name, value in (constrained.get(group) or {}).items():
            rows.setdefault(name, (value, (free.get(group) or {}).get(name)))
    frame = pd.DataFrame(list(rows.values()), index=list(rows), columns=["with the schema", "without it"],
                         dtype=object)
    return ("<h2>What decoding under the schema adds</h2><p class=\"meta\">The same student on a subset of the "
            "test rows, decoded without the answer schema.</p>" + _table(frame, "unconstrained"))


def _serving(latency: dict) -> str:
    student, teacher = latency.get("student") or {}, latency.get("teacher") or {}
    rows = [("input tokens / request", "input_tokens"), ("output tokens / request", "output_tokens"),
            ("p50 latency, batch 1 (s)", "p50_s"), ("p95 latency, batch 1 (s)", "p95_s"),
            ("batched throughput (tokens/s)", "batched_tokens_per_s"),
            ("cost per 1M requests (USD)", "cost_per_1m_requests_usd")]
    frame = pd.DataFrame(
        [[student.get(k), teacher.get(k), _ratio(teacher.get(k), student.get(k))] for _, k in rows],
        index=[r for r, _ in rows], columns=["student", "teacher", "teacher ÷ student"], dtype=object)
    note = f"<p class=\"meta\">Teacher figures: {_esc(teacher['source'])}.</p>" if teacher.get("source") else ""
    return _table(frame, "serving") + note


def _failures(failures: Any) -> str:
    frame = failures if isinstance(failures, pd.DataFrame) else pd.DataFrame(list(failures))
    if not len(frame):
        return "<h2>Failures</h2><p>The student agrees with the teacher on every test row.</p>"
    sample = frame.head(FAILURE_SAMPLE)
    cols = [c for c in ("id", "label", "detail", "teacher", "student", "input", "abs_error", "chrf")
            if c in sample.columns]
    return (f"<h2>Failures (first {len(sample)} of {len(frame)})</h2>"
            + _table(sample[cols], "failures", index=False, cut=TEXT_CHARS, css_class="failures"))


# --- plots ------------------------------------------------------------------------------------------------

def _plots(metrics: dict, kind: str, loss_curves: dict | None, latency: dict | None, training: dict | None) -> str:
    imgs = []
    if loss_curves and any(loss_curves.get(k) for k in loss_curves):
        imgs.append(_img(_loss_plot(loss_curves, training or {}), "training and validation loss"))
    task_plot = {"classification": _confusion_plot, "extraction": _field_plot, "regression": _dimension_plot,
                 "generation": _chrf_plot}.get(kind)
    plotted = task_plot(metrics) if task_plot else None
    if plotted:
        imgs.append(_img(*plotted))
    if latency and (latency.get("student") or {}).get("p50_s") is not None:
        imgs.append(_img(_latency_plot(latency), "latency"))
    return ("<h2>Plots</h2>" + "".join(f"<p>{i}</p>" for i in imgs)) if imgs else ""


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # no Software tag: it carries matplotlib's web address, and the page names no address at all
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(png: str, alt: str) -> str:
    return f"<img class=\"plot\" alt=\"{_esc(alt)}\" src=\"data:image/png;base64,{png}\">"


def _loss_plot(curves: dict, training: dict) -> str:
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    for name, points in curves.items():
        pts = [(float(s), float(v)) for s, v in (points or [])]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, label=str(name))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    title = "loss during training"
    if training.get("best_val_loss") is not None:
        title += f" (best val {training['best_val_loss']:.4g}"
        title += f", final train {training['final_train_loss']:.4g})" if training.get("final_train_loss") \
            is not None else ")"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _confusion_plot(metrics: dict) -> tuple[str, str] | None:
    cm = metrics.get("confusion_matrix")
    if not cm:
        return None
    counts, rows, cols = cm["counts"], cm["teacher"], cm["student"]
    fig = _figure(max(4.5, 0.7 * len(cols) + 2.5), max(3.5, 0.5 * len(rows) + 2))
    ax = fig.add_subplot()
    im = ax.imshow(counts, cmap="Blues")
    top = max((max(r) for r in counts), default=0)
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "#1d2430")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title("confusion matrix")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig), "confusion matrix: teacher label by student label"


def _field_plot(metrics: dict) -> tuple[str, str] | None:
    acc = metrics.get("per_field_accuracy")
    if not acc:
        return None
    names, values = list(acc), [v if v is not None else 0.0 for v in acc.values()]
    fig = _figure(7.5, 0.38 * len(names) + 1.4)
    ax = fig.add_subplot()
    bars = ax.barh(names, values, color="#4a78c2")
    ax.invert_yaxis()  # the schema's order, top down
    ax.set_xlim(0, 1.08)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    head = metrics.get("headline_value")
    title = "per-field accuracy"
    if head is not None:  # named in the title: a legend box would sit on a bar
        ax.axvline(head, color="#b3261e", linestyle="--", linewidth=1)
        title += f" (dashed: field agreement {head:.3f})"
    ax.set_xlabel("accuracy (share of test rows)")
    ax.set_title(title)
    return _png(fig), "per-field accuracy"


def _dimension_plot(metrics: dict) -> tuple[str, str] | None:
    dims = metrics.get("per_dimension")
    if not dims:
        return None
    names = list(dims)
    mae = [dims[n].get("mae") or 0.0 for n in names]
    rmse = [dims[n].get("rmse") or 0.0 for n in names]
    fig = _figure(max(5.0, 1.1 * len(names) + 3), 3.6)
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], mae, width=0.4, label="MAE", color="#4a78c2")
    ax.bar([x + 0.2 for x in xs], rmse, width=0.4, label="RMSE", color="#e0883b")
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("error (the field's units)")
    ax.set_title("error per dimension (lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig), "MAE and RMSE per dimension"


def _chrf_plot(metrics: dict) -> tuple[str, str] | None:
    hist = metrics.get("chrf_histogram")
    if not hist:
        return None
    edges, counts = hist["edges"], hist["counts"]
    fig = _figure(6.5, 3.2)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=[b - a for a, b in pairwise(edges)], align="edge", color="#4a78c2",
           edgecolor="white")
    ax.set_xlabel("sentence chrF (0-100)")
    ax.set_ylabel("test rows")
    ax.set_title("per-row chrF")
    return _png(fig), "histogram of per-row chrF"


def _latency_plot(latency: dict) -> str:
    student, teacher = latency.get("student") or {}, latency.get("teacher") or {}
    bars = [("student p50", student.get("p50_s"), "#4a78c2"), ("student p95", student.get("p95_s"), "#8fb0e3"),
            ("teacher p50", teacher.get("p50_s"), "#e0883b")]
    bars = [b for b in bars if b[1] is not None]
    fig = _figure(5.5, 3.0)
    ax = fig.add_subplot()
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.bar_label(drawn, labels=[f"{b[1]:.3g} s" for b in bars], padding=2, fontsize=8)
    ax.set_ylabel("seconds per request (batch 1)")
    ax.set_title("latency")
    ax.margins(y=0.15)
    return _png(fig)


# --- helpers ----------------------------------------------------------------------------------------------

def _table(frame: pd.DataFrame, uid: str, *, index: bool = True, cut: int | None = None,
           css_class: str = "metrics") -> str:
    # a fixed uuid: the same report renders to the same page; our own formatter escapes, after cutting,
    # so an entity is never cut in half
    styler = frame.style.format(lambda v: _esc(_fmt(v, cut))).format_index(lambda v: _esc(_fmt(v)), axis=0) \
        .format_index(lambda v: _esc(_fmt(v)), axis=1)
    styler.set_uuid(uid).set_table_attributes(f"class=\"{css_class}\"")
    if not index:
        styler = styler.hide(axis="index")
    if list(frame.columns) == ["value"]:  # a name -> figure list: the header says nothing
        styler = styler.hide(axis="columns")
    return styler.to_html()


def _column(data: dict) -> pd.DataFrame:
    # object dtype: a count next to a rate stays a count (a float column would print 3 as 3.0000)
    return pd.DataFrame({"value": pd.Series(list(data.values()), dtype=object)}).set_axis(list(data))


def _fmt(value: Any, cut: int | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # rates and losses keep 4 decimals; tokens, seconds and dollars in the tens and hundreds fewer
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    text = str(value)
    return text[:cut] + " …" if cut and len(text) > cut else text


def _esc(value: Any) -> str:
    return html_lib.escape(str(value), quote=True)


def _ratio(teacher: Any, student: Any) -> float | None:
    try:
        return float(teacher) / float(student) if teacher and student else None
    except (TypeError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return _jsonable(value.to_dict(orient="records"))
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

