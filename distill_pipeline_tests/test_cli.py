"""`distill demo` end to end on an embedded Postgres: twice, without duplicating anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

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
