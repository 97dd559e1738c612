"""The benches' Postgres: the given server (or an embedded pgserver), and a database of their own on it."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def own_database(url: str | None, workdir: Path, prefix: str) -> str:
    """URL of a new database `<prefix>_<pid>` on `url`'s server (an embedded one under `workdir` when None),
    so no table of anyone's is touched."""
    import psycopg

    if not url:
        import pgserver

        url = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete").get_uri()
    name = f"{prefix}_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(url)._replace(path="/" + name))
