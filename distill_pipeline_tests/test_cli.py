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
