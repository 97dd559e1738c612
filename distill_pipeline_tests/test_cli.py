"""`distill demo` end to end on an embedded Postgres: twice, without duplicating anything."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from distill_pipeline_tests.train_support import demo_tokenizer_dir, tiny_models  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def run_demo(home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DISTILL_CONFIG")}
    env.update(DISTILL_HOME=str(home), DAGSTER_HOME=str(home / "dagster"))
    proc = subprocess.run([sys.executable, "-m", "distill_pipeline.cli", "demo", "--rows", "600",
                           "--stop-after", "dataset_splits"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_twice_on_the_embedded_postgres(tmp_path):
    home = tmp_path / "home"
    first = run_demo(home)
    assert "600 new rows" in first and "dataset_splits" in first
    splits = sorted((home / "artifacts" / "dataset_splits").iterdir())
    assert len(splits) == 2  # both demo prompt versions
    counts = {p.name: json.loads((p / "manifest.json").read_text())["splits"] for p in splits}

    second = run_demo(home)
    assert "0 new rows" in second
    source = json.loads((home / "artifacts" / "source_rows" / "manifest.json").read_text())
    assert source["rows"] == 600
    again = {p.name: json.loads((p / "manifest.json").read_text())["splits"] for p in splits}
    assert {k: {s: v["rows"] for s, v in c.items()} for k, c in again.items()} == \
        {k: {s: v["rows"] for s, v in c.items()} for k, c in counts.items()}
    train = pq.read_table(splits[0] / "train.parquet")
    assert train.num_rows > 0 and set(train.column_names) >= {"input", "target", "label", "cluster_key"}


def distill(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL", "DAGSTER_HOME", "MLFLOW_"))
            and k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "distill_pipeline.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def test_unknown_assets_partitions_and_stop_after_exit_nonzero_listing_valid_names(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"home: {tmp_path / 'home'}\nprompts_dir: {REPO / 'distill_pipeline/demo/prompts'}\n")
    assets = "source_rows, teacher_labels, curated_examples, dataset_splits, student_adapter"

    proc = distill("--config", str(config), "materialize", "no_such_asset", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown asset(s) no_such_asset" in proc.stderr and assets in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = distill("--config", str(config), "materialize", "dataset_splits", "--partition", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown prompt version 'nope'" in proc.stderr
    assert "sec_events_v1-" in proc.stderr and "sec_events_v2-" in proc.stderr  # the registered ones, listed

    proc = distill("--config", str(config), "materialize", "dataset_splits", cwd=tmp_path)
    assert proc.returncode == 2 and "pass --partition" in proc.stderr

    proc = distill("--config", str(config), "demo", "--stop-after", "source_rows", cwd=tmp_path)
    assert proc.returncode == 2 and "--stop-after source_rows" in proc.stderr
    assert "teacher_labels, curated_examples, dataset_splits, student_adapter, eval_report, gguf_model" in proc.stderr
    assert not (tmp_path / "home" / "pgdata").exists()  # refused before anything was started


# --- what a person sees: one line per stage, bars, the paths; the full log in a file ---------------------------

STAGE_LINE = re.compile(r"^  (?P<stage>\w+) +(?P<figures>.+?)  (?P<seconds>\d+\.\d) s$")


def demo(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return distill("demo", "--rows", "300", "--stop-after", "dataset_splits", *args, cwd=REPO,
                   env={"DISTILL_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), **env})


def log_file(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("full log: ")]
    return Path(line.removeprefix("full log: "))


def blocks(stdout: str) -> dict[str | None, list[re.Match]]:
    """Stage lines by the prompt version of the run they came in (None: the export)."""
    out: dict[str | None, list[re.Match]] = {}
    partition = None
    for line in stdout.splitlines():
        if line.startswith("materializing "):
            partition = line.rsplit("[", 1)[1].rstrip("]") if line.endswith("]") else None
        elif (match := STAGE_LINE.match(line)) is not None:
            out.setdefault(partition, []).append(match)
    return out


def test_demo_shows_one_line_per_stage_with_its_figures_and_logs_dagster_to_a_file(tmp_path):
    home = tmp_path / "home"
    proc = demo(home, DISTILL_PROGRESS="1")  # bars forced: stderr is a pipe here
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) < 30, proc.stdout
    for text in (proc.stdout, proc.stderr):
        assert "DEBUG" not in text and "dagster - " not in text and "alembic" not in text and "Warning" not in text

    by_run = blocks(proc.stdout)
    ((export,),) = [by_run.pop(None)]
    assert export["stage"] == "source_rows" and export["figures"].startswith("300 rows exported")
    assert sorted(by_run) == sorted(p.name for p in (home / "artifacts" / "dataset_splits").iterdir())
    for pv, stages in by_run.items():
        assert [m["stage"] for m in stages] == ["teacher_labels", "curated_examples", "dataset_splits"]
        labels = pq.read_table(home / "artifacts" / "teacher_labels" / pv / "labels.parquet").to_pylist()
        statuses = [row["status"] for row in labels]
        assert stages[0]["figures"].startswith(f"{len(labels)} labels: ")
        assert f"; {statuses.count('ok')} ok, {statuses.count('invalid')} invalid, " \
               f"{statuses.count('failed')} failed" in stages[0]["figures"]
        curated = json.loads((home / "artifacts" / "curated_examples" / pv / "manifest.json").read_text())["counts"]
        assert stages[1]["figures"].startswith(f"{curated['kept']} of {curated['rows_in']} rows kept")
        splits = json.loads((home / "artifacts" / "dataset_splits" / pv / "manifest.json").read_text())["splits"]
        assert stages[2]["figures"].startswith(f"train {splits['train']['rows']} / val {splits['val']['rows']} / "
                                               f"test {splits['test']['rows']} rows")
    assert re.search(r"source_rows export: 100%\|.*\| 300/300 ", proc.stderr)  # the export's bar

    log = log_file(proc.stdout)
    assert lines[-1] == f"  {'full log':18s} {log}"
    text = log.read_text()
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    runs = instance.get_runs()
    assert len(runs) == 3 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    for run in runs:  # every event of every run, in Dagster's format, at DEBUG
        for record in instance.all_logs(run.run_id):
            if record.dagster_event is not None:
                assert f"{run.run_id} - " in text
        assert len(re.findall(rf" - dagster - DEBUG - {run.job_name} - {run.run_id} - \d+ - .*STEP_SUCCESS", text)) \
            == sum(1 for r in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS))
        assert re.search(rf" - dagster - DEBUG - {run.job_name} - {run.run_id} - \d+ - RUN_SUCCESS - ", text)
    assert "INFO alembic.runtime.migration" in text  # Python's log records too


def test_a_failing_stage_prints_one_error_line_and_exits_nonzero(tmp_path):
    home = tmp_path / "home"
    # A confidence threshold that would quarantine most rows: curated_examples refuses (ValueError).
    proc = demo(home, DISTILL__CURATE__MIN_CONFIDENCE="9.9")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "DEBUG" not in proc.stdout + proc.stderr
    (failed,) = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert failed.startswith("  curated_examples FAILED: ValueError: the confidence filter would quarantine ")
    assert "(stack trace in the log)" in failed
    log = log_file(proc.stdout)
    (pv,) = re.findall(r"materialization of teacher_labels, curated_examples, dataset_splits \[(\S+)\] failed; "
                       rf"the full log: {re.escape(str(log))}; ", proc.stderr)
    assert "sec_events_v2" not in proc.stdout  # the demo stopped at the first failure
    text = log.read_text()
    assert re.search(r" - dagster - ERROR - .* - curated_examples - STEP_FAILURE - .*\n+.*\n+ValueError: the confidence "
                     r"filter would quarantine .*\n+Stack Trace:\n  File ", text)

    # A blocking check that fails (no example kept) keeps its line with the figures; the demo goes on.
    proc = demo(home, DISTILL__CURATE__MIN_CONFIDENCE="10.5", DISTILL__CURATE__MAX_LOW_CONFIDENCE_SHARE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert len(checks) == 2 and all(re.fullmatch(r"  check curated_examples\.has_examples FAILED \[sec_events_v\d-\w+\]: "
                                                 r'\{"kept": 0\}', line) for line in checks), proc.stdout
    kept = [m["figures"] for ms in blocks(proc.stdout).values() for m in ms if m["stage"] == "curated_examples"]
    assert len(kept) == 2 and all(k.startswith("0 of 300 rows kept; dropped: ") for k in kept)
    assert log_file(proc.stdout) != log  # one log per command
    assert pv


def test_progress_messages_round_trip_and_the_training_worker_sends_them():
    from distill_pipeline.console import Progress, parse_progress, progress_message
    from distill_pipeline.workers.train import pipes_line

    assert parse_progress(progress_message("eval", 8, 72, "answers", "constrained")) == \
        Progress("eval", 8, 72, "answers", "constrained")
    assert parse_progress(progress_message("gguf", 0, 12, "rows")) == Progress("gguf", 0, 12, "rows", "")
    assert parse_progress("step 4/48 loss=2.1") is None and parse_progress("progress: 4/48") is None
    line = pipes_line("progress", {"step": 4, "max_steps": 48, "epoch": 0.1, "loss": 2.0841, "grad_norm": 1.2})
    assert parse_progress(line) == Progress("train", 4, 48, "steps", "loss=2.084 grad_norm=1.2")
    assert pipes_line("checkpoint", {"step": 4}) == 'checkpoint: {"step": 4}'


def test_eval_answers_batch_by_batch_are_those_of_one_call(tiny_models):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_pipeline.demo.data import generate_rows
    from distill_pipeline.stages import student_generation
    from distill_pipeline.workers.eval import answer_by_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    texts = list(dict.fromkeys(row.sentence for row in generate_rows(60, seed=5)))[:11]
    settings = {"instruction": "Extract the event.", "max_new_tokens": 6, "batch_size": 4}
    whole = student_generation.generate_answers(model, tokenizer, texts, **settings)
    batches: list[int] = []
    parts = answer_by_batch(model, tokenizer, texts, on_batch=batches.append, **settings)
    assert batches == [4, 4, 3]
    assert [(a.text, a.prompt_tokens, a.output_tokens) for a in parts] == \
        [(a.text, a.prompt_tokens, a.output_tokens) for a in whole]
    assert len({a.text for a in whole}) > 1  # distinct answers: the order back to the inputs is checked


def test_materialize_draws_the_workers_progress_and_ends_with_the_report_and_gguf(tmp_path, tiny_models):  # noqa: F811
    """student_adapter, eval_report and gguf_model on a tiny model through `distill materialize`: their
    worker processes' progress (through Pipes) as bars, one line each, the report and the GGUF at the end."""
    import random

    from distill_pipeline.clients import tracking
    from distill_pipeline.stages.prompts import load_prompts

    prompts = REPO / "distill_pipeline" / "demo" / "prompts"
    pv = sorted(load_prompts(prompts))[0]
    home = tmp_path / "home"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(home), "prompts_dir": str(prompts),
        "task": {"kind": "classification", "labels": ["billing", "outage"]},
        "train": {"base_model": {"source": str(tiny_models["qwen2"])}, "max_seq_len": 128, "micro_batch_size": 8,
                  "max_steps": 8, "eval_steps": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "logging_steps": 2, "sample_count": 0, "early_stopping_patience": None,
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "eval": {"batch_size": 4, "max_new_tokens": 8, "unconstrained_rows": 4, "latency_requests": 2,
                 "registered_model": "routing-student", "min_headline": 0.5},
        "gguf": {"out_type": "F16", "parity_rows": 4, "max_new_tokens": 8}}))
    splits = home / "artifacts" / "dataset_splits" / pv
    splits.mkdir(parents=True)
    rng, manifest = random.Random(1), {"splits": {}}
    for name, n in (("train", 32), ("val", 8), ("test", 10)):
        rows = [{"id": f"{name}-{i}", "input": f"ticket {rng.randint(1, 999)}: please look at my account",
                 "target": "billing" if i % 10 else "outage", "label": "billing" if i % 10 else "outage",
                 "cluster_key": f"{name}-{i}", "confidence": 1.0} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), splits / f"{name}.parquet")
        manifest["splits"][name] = {"rows": n, "sha256": tracking.file_sha256(splits / f"{name}.parquet")}
    (splits / "manifest.json").write_text(json.dumps(manifest))

    proc = distill("--config", str(config), "materialize", "student_adapter", "eval_report", "gguf_model",
                   "--partition", pv, cwd=tmp_path, env={"DISTILL_PROGRESS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {m["stage"]: m["figures"] for m in blocks(proc.stdout)[pv]}
    assert list(stages) == ["student_adapter", "eval_report", "gguf_model"], proc.stdout
    assert re.match(r"8/8 steps, val loss \d+\.\d{3} -> \d+\.\d{3} \(best\), [\d,]+ tokens/s$", stages["student_adapter"])
    assert re.match(r"accuracy \d\.\d{3} \(without the schema \d\.\d{3}\) on 10 test rows, p50 \d+\.\d\d s(, .*)? - "
                    r"gate passed, registered as version 1$", stages["eval_report"]), stages["eval_report"]
    gguf = home / "artifacts" / "gguf_model" / pv / f"routing-student-{pv}-f16.gguf"
    assert stages["gguf_model"].startswith(f"{gguf.name}, ") and "parity passed" in stages["gguf_model"]
    bars = proc.stderr.replace("\r", "\n")
    # Each worker's progress, drawn here from its Pipes messages, up to the end: 8 steps; 10 + 4 + 2 answers;
    # the 4 parity rows checked, then answered.
    assert re.search(r"student_adapter train: 100%\|.*\| 8/8 ", bars), bars[-2000:]
    assert re.search(r"eval_report: 100%\|.*\| 16/16 ", bars), bars[-2000:]
    assert re.search(r"gguf_model: 100%\|.*\| 8/8 ", bars), bars[-2000:]
    lines = proc.stdout.splitlines()
    assert f"  {'eval report':18s} {home / 'artifacts' / 'eval_report' / pv / 'eval_report.html'}" in lines
    assert f"  {'GGUF':18s} {gguf}" in lines
    assert "DEBUG" not in proc.stdout + proc.stderr and "Loading weights" not in proc.stdout + proc.stderr
    text = log_file(proc.stdout).read_text()
    # The workers' own output is in the log, and so are their progress messages as Dagster logged them.
    assert "progress train 8/8 steps" in text and "progress eval 16/16 answers" in text
    assert "progress gguf 8/8 rows" in text
