"""Shared fixtures: a real Postgres for every test that needs one.

The server is the one named by DISTILL_TEST_DATABASE_URL when set (e.g. the
machine's 127.0.0.1:5432), else an embedded pgserver started for the session.
Each test gets its own fresh database, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

# Tests are hermetic: the caller's pipeline settings (`make` exports DISTILL_HOME, a user may have
# DATABASE_URL or DISTILL__* set) must not leak into them; tests set what they need themselves.
for _name in [n for n in os.environ if n.startswith("DISTILL") or n in ("DATABASE_URL", "DAGSTER_HOME",
                                                                          "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")]:
    if _name != "DISTILL_TEST_DATABASE_URL":
        del os.environ[_name]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory) -> str:
    url = os.environ.get("DISTILL_TEST_DATABASE_URL")
    if url:
        return url
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    return server.get_uri()


@pytest.fixture()
def db_url(pg_server_url) -> str:
    """URL of a brand-new empty database on the test server."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def distill_home(tmp_path) -> Path:
    home = tmp_path / "distill_home"
    home.mkdir()
    return home
