"""The Dagster code location loads, and a real materialization of the data assets succeeds."""

import dagster as dg
import pyarrow.parquet as pq
import pytest

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import load_config
from distill_pipeline.demo.seed import demo_prompt_keys, seed_demo_table

DESIGN_KEYS = ["source_rows", "teacher_labels", "curated_examples", "dataset_splits", "student_adapter",
               "eval_report", "gguf_model"]


def test_definitions_load_with_the_design_keys_and_checks():
    from distill_pipeline.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"source_rows", "curated_examples", "dataset_splits"} <= keys
    assert keys <= set(DESIGN_KEYS)
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"no_leakage_between_splits", "no_empty_split", "label_shares_match_whole",
            "targets_match_task_schema"} <= checks
    assert defs.resolve_schedule_def("nightly") and defs.resolve_sensor_def("refresh_after_export")


def test_definitions_import_no_heavy_ml_libraries():
    import subprocess
    import sys

    code = ("import sys, distill_pipeline.definitions; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture()
def demo_env(db_url, distill_home, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(distill_home))
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.delenv("DISTILL_CONFIG", raising=False)
    cfg = load_config()
    seed_demo_table(Database(db_url), cfg.source.table, cfg.prompts_dir, rows=1500, seed=11)
    return cfg


def test_materialize_the_data_assets_over_demo_data(demo_env):
    from distill_pipeline.definitions import defs
    from distill_pipeline.defs.partitions import prompt_versions

    cfg = demo_env
    instance = dg.DagsterInstance.ephemeral()
    v1, v2 = demo_prompt_keys(cfg.prompts_dir)
    instance.add_dynamic_partitions(prompt_versions.name, [v1, v2])
    assets = list(defs.assets) + list(defs.asset_checks or [])
    resources = dict(defs.resources)

    exported = dg.materialize(assets, selection=["source_rows"], instance=instance, resources=resources)
    assert exported.success
    meta = exported.asset_materializations_for_node("source_rows")[0].metadata
    assert meta["rows_total"].value == 1500 and "password" not in str(meta)

    chain = [k for k in DESIGN_KEYS[1:4] if k in {a.key.to_user_string() for a in defs.assets}]
    result = dg.materialize(assets, selection=chain, partition_key=v1, instance=instance, resources=resources)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["no_leakage_between_splits"] and checks["no_empty_split"] and checks["targets_match_task_schema"]
    if "teacher_labels" in chain:  # v1: rows stored under v1 reused, the others asked from the demo teacher
        labelled = result.asset_materializations_for_node("teacher_labels")[0].metadata
        assert labelled["reused"].value > 0 and labelled["requested"].value > 0
    curated = result.asset_materializations_for_node("curated_examples")[0].metadata
    assert curated["kept"].value > 500 and curated["dropped_output_invalid"].value > 0
    assert curated["dropped_exact_duplicate"].value > 0 and curated["dropped_near_duplicate"].value > 0
    splits = {n: pq.read_table(cfg.stage_dir("dataset_splits", v1) / f"{n}.parquet") for n in ("train", "val", "test")}
    assert sum(t.num_rows for t in splits.values()) == curated["kept"].value
    assert "skip" in set(splits["train"].column("label").to_pylist())
