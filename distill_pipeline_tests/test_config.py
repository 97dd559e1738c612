from pathlib import Path

import pytest

from distill_pipeline.config import ConfigError, load_config
from distill_pipeline.stages.prompts import KEY_PATTERN, load_prompts

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in REPO.rglob("*.yaml")
                 if ".venv" not in p.parts and ".distill" not in p.parts and "prompts" not in p.parts
                 and p.name not in ("workspace.yaml", "dagster.yaml") and "docker" not in p.parts)


def test_shipped_configs_are_found():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    cfg = load_config(path, env={})
    assert cfg.prompts_dir.is_dir()
    for key in load_prompts(cfg.prompts_dir):
        assert KEY_PATTERN.match(key) and "," not in key


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, "source:\n  tabel: x\n")
    with pytest.raises(ConfigError, match=r"source\.tabel"):
        load_config(path, env={})


def test_bad_value_is_named_with_its_origin(tmp_path):
    path = _write(tmp_path, "split:\n  train: 0.8\n  val: 0.1\n  test: 0.2\n")
    with pytest.raises(ConfigError, match=r"split.*must be 1"):
        load_config(path, env={})
    ok = _write(tmp_path, "curate:\n  min_confidence: 7\n")
    with pytest.raises(ConfigError, match=r"curate\.lsh_bands.*DISTILL__CURATE__LSH_BANDS"):
        load_config(ok, env={"DISTILL__CURATE__LSH_BANDS": "7"})


def test_env_overrides(tmp_path):
    path = _write(tmp_path, "source:\n  table: events\n")
    cfg = load_config(path, env={"DISTILL_HOME": str(tmp_path / "h"), "DATABASE_URL": "postgresql://u:pw@h/db",
                                 "DISTILL__SOURCE__MIN_CONFIDENCE": "8", "DISTILL__CURATE__WORKERS": "1"})
    assert cfg.home == tmp_path / "h"
    assert cfg.database.url.get_secret_value() == "postgresql://u:pw@h/db"
    assert "pw" not in repr(cfg) and "pw" not in str(cfg.model_dump(mode="json"))
    assert cfg.source.min_confidence == 8 and cfg.curate.workers == 1


@pytest.mark.parametrize("setting", [
    "source:\n  table: 'events; DROP TABLE users'\n",
    "source:\n  table: 'a.b.c'\n",
    "source:\n  columns:\n    input: 'text\" FROM users --'\n",
    "database:\n  schema_name: 'x y'\n",
])
def test_sql_injection_through_config_is_refused(tmp_path, setting):
    with pytest.raises(ConfigError, match="not a plain SQL identifier|expected `table`"):
        load_config(_write(tmp_path, setting), env={})


def test_task_needs_its_settings(tmp_path):
    with pytest.raises(ConfigError, match="task.labels"):
        load_config(_write(tmp_path, "task:\n  kind: classification\n"), env={})
    with pytest.raises(ConfigError, match="label_field"):
        load_config(_write(tmp_path, "task:\n  kind: extraction\n  label_field: nope\n  fields:\n    a: {}\n"),
                    env={})


def test_one_base_model_cache_per_machine(tmp_path, monkeypatch):
    """Every home shares one converted base model: the cache is not under DISTILL_HOME."""
    from distill_pipeline.config import BaseModelConfig

    monkeypatch.delenv("DISTILL_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert BaseModelConfig().cache_root() == tmp_path / "xdg" / "distill_pipeline" / "base_models"
    assert load_config(env={"DISTILL_HOME": str(tmp_path / "a")}).train.base_model.cache_root() == \
        load_config(env={"DISTILL_HOME": str(tmp_path / "b")}).train.base_model.cache_root()
    monkeypatch.setenv("DISTILL_MODEL_CACHE", str(tmp_path / "shared"))
    assert BaseModelConfig().cache_root() == tmp_path / "shared"
    assert BaseModelConfig(cache_dir=tmp_path / "mine").cache_root() == tmp_path / "mine"
