"""Postgres: the team's own server (a URL), or an embedded one (pgserver) under DISTILL_HOME.

The URL is a secret (it may carry a password): use `Database.safe_url` in logs
and metadata, never `url`.

Teams often have their URL in SQLAlchemy form (`postgresql+psycopg://`, `postgresql+psycopg2://`)
or Heroku form (`postgres://`): `normalize_url` turns those into the libpq form psycopg and ADBC
take, here and nowhere else, and `Database.sqlalchemy_url` gives the SQLAlchemy form back.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from pathlib import Path
from typing import Iterator

import psycopg

from distill_pipeline.config import ConfigError, PipelineConfig
from distill_pipeline.masking import mask, mask_url

log = logging.getLogger(__name__)


def quote_ident(name: str) -> str:
    """Quote an identifier that `config.check_identifier` already accepted."""
    return '"' + name.replace('"', '""') + '"'


def quote_table(table: str) -> str:
    return ".".join(quote_ident(part) for part in table.split("."))


def embedded_url(home: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under `home/pgdata` and return its URL.

    pgserver keeps one server per data folder and shares it between processes
    (Dagster webserver, daemon, run workers); it stops when the last one exits.
    """
    import pgserver  # imported here: only the embedded default needs it

    data_dir = (home / "pgdata").resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir)
    return server.get_uri()


_URL_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")


def normalize_url(url: str) -> str:
    """`url` as libpq (psycopg, ADBC) accepts it: `postgresql+<driver>://` and `postgres://` become
    `postgresql://`; a libpq keyword string (`host=... dbname=...`) is left as it is."""
    url = url.strip()
    match = _URL_SCHEME.match(url)
    if match is None:
        return url
    base = match.group("scheme").lower().partition("+")[0]
    if base not in ("postgresql", "postgres"):
        # Only the scheme is shown: the rest of the URL may hold a password.
        raise ConfigError(f"database.url (or DATABASE_URL): {match.group('scheme')}:// is not a Postgres URL; "
                          "expected postgresql://user:password@host:5432/db (postgresql+psycopg:// and "
                          "postgres:// are accepted too)")
    return "postgresql://" + url[match.end():]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Database:
    def __init__(self, url: str, schema_name: str = "distill"):
        self.url = normalize_url(url)
        self.schema_name = schema_name

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "Database":
        url = cfg.database.url.get_secret_value() if cfg.database.url else embedded_url(cfg.home)
        return cls(url, cfg.database.schema_name)

    @property
    def safe_url(self) -> str:
        return mask_url(self.url)

    @property
    def sqlalchemy_url(self) -> str:
        """The SQLAlchemy form (psycopg 3 dialect). A keyword string has no URL form: then only the
        dialect is named, and the engine must connect through `connect` (create_engine(creator=...))."""
        if self.url.startswith("postgresql://"):
            return "postgresql+psycopg://" + self.url[len("postgresql://"):]
        return "postgresql+psycopg://"

    def connect(self, autocommit: bool = False) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=autocommit)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot connect to Postgres at {self.safe_url}: {_one_line(exc)}") from None
        except psycopg.ProgrammingError as exc:  # libpq could not parse it; its message quotes the whole URL
            raise ConnectionError(f"database.url (or DATABASE_URL) is not a valid Postgres URL: "
                                  f"{_one_line(mask(str(exc), self.url))}") from None

    @contextlib.contextmanager
    def cursor(self) -> Iterator[psycopg.Cursor]:
        with self.connect() as conn, conn.cursor() as cur:
            yield cur

    @contextlib.contextmanager
    def arrow_source(self) -> Iterator["ArrowSource"]:
        """Reads queries as Arrow batches; one per export, shared by its streams."""
        import adbc_driver_manager

        try:
            source = ArrowSource(self.url)  # ADBC connects here
        except adbc_driver_manager.Error as exc:
            raise ConnectionError(f"cannot connect to Postgres at {self.safe_url}: "
                                  f"{_one_line(mask(str(exc), self.url))}") from None
        with contextlib.closing(source):
            yield source


class ArrowSource:
    """Query results as pyarrow record batches, straight from Postgres COPY binary (ADBC).

    ADBC's low-level API: its DB-API module imports pandas and pyarrow.dataset, a quarter of
    a second in every fresh run process, for nothing we use. Loading the driver (the ADBC
    database) costs ~50 ms, so parallel streams share one and open a connection each.
    """

    def __init__(self, url: str):
        import adbc_driver_postgresql

        self._database = adbc_driver_postgresql.connect(url)
        self._lock = threading.Lock()  # connections are opened one at a time on the shared handle

    @contextlib.contextmanager
    def batches(self, sql: str, batch_bytes: int) -> Iterator:
        """A pyarrow RecordBatchReader over `sql`, in batches of about `batch_bytes`."""
        import adbc_driver_manager
        import pyarrow as pa

        with contextlib.ExitStack() as stack:
            with self._lock:
                conn = stack.enter_context(contextlib.closing(adbc_driver_manager.AdbcConnection(self._database)))
            stmt = stack.enter_context(contextlib.closing(adbc_driver_manager.AdbcStatement(conn)))
            stmt.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(batch_bytes)})
            stmt.set_sql_query(sql)
            stream, _ = stmt.execute_query()
            yield stack.enter_context(contextlib.closing(pa.RecordBatchReader.from_stream(stream)))

    def close(self) -> None:
        self._database.close()
