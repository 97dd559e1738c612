"""The label cache: every teacher answer (and every failure) in Postgres, keyed by (prompt version, input hash).

Table `<schema>.label_cache`, one row per key:
    status      'ok' | 'invalid' (answered, but the answer fails the task's validation; raw text kept)
                | 'failed' (no answer after the bounded attempts; `error` says why)
    output      the teacher's raw answer text (NULL when failed)
    tokens_in, tokens_out, cost_usd, latency_ms, attempts, teacher_model, finish_reason, created_at, updated_at

Each answer is committed as soon as it arrives (a group commit: see CacheWriter), so a run killed
with SIGKILL loses only the answers of the requests in flight at that moment, and a re-run asks only
for the keys that are missing.

Two runs of the same partition at once: each run holds a Postgres advisory lock on its partition
(a session lock on a dedicated connection) while it looks up and requests keys, so the second run
waits, then finds everything in the cache and sends nothing. We chose the lock over per-row
'pending' claims with leases because it cannot go stale: when a run dies, however it dies, its
connection closes and Postgres releases the lock at once, so a re-run never waits for a lease to
expire and no claim row needs cleaning up. Runs of different partitions never share keys, so they
never wait for each other. (It needs a session: connect directly or through a session-mode pooler,
not a transaction-mode pgbouncer.) The upsert also never overwrites a completed answer, as a second
line of defence.

Table `<schema>.label_samples` keeps the frozen sampling threshold of each prompt version
(see `stages.teacher_labels.sample_mask`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import psycopg

from distill_pipeline.clients.postgres import Database, quote_ident

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 10_000
WRITER_APP_NAME = "distill label cache writer"


@dataclass(frozen=True)
class CachedLabel:
    input_hash: str
    status: str  # ok | invalid | failed
    output: str | None
    error: str | None
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float | None
    latency_ms: float | None
    attempts: int | None
    teacher_model: str | None


COLUMNS = ("input_hash", "status", "output", "error", "tokens_in", "tokens_out", "cost_usd", "latency_ms",
           "attempts", "teacher_model")


class LabelCache:
    def __init__(self, db: Database):
        self.db = db
        self.schema = quote_ident(db.schema_name)
        self.table = f"{self.schema}.label_cache"
        self.samples = f"{self.schema}.label_samples"

    def ensure(self) -> None:
        # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog: serialize the DDL
        # of all runs with a transaction-level advisory lock.
        with self.db.connect() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_id("ddl"),))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            conn.execute(f"""
                CREATE TABLE IF NOT EXISTS {self.table} (
                    prompt_version text NOT NULL,
                    input_hash     text NOT NULL,
                    status         text NOT NULL CHECK (status IN ('ok', 'invalid', 'failed')),
                    output         text,
                    error          text,
                    tokens_in      integer,
                    tokens_out     integer,
                    cost_usd       double precision,
                    latency_ms     double precision,
                    attempts       integer,
                    teacher_model  text,
                    finish_reason  text,
                    created_at     timestamptz NOT NULL DEFAULT now(),
                    updated_at     timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (prompt_version, input_hash)
                )""")
            conn.execute(f"""
                CREATE TABLE IF NOT EXISTS {self.samples} (
                    prompt_version text PRIMARY KEY,
                    sample_size    bigint NOT NULL,
                    salt           text NOT NULL,
                    threshold      numeric(20, 0) NOT NULL,
                    created_at     timestamptz NOT NULL DEFAULT now()
                )""")

    def lock_id(self, prompt_version: str) -> int:
        digest = hashlib.sha256(f"{self.db.schema_name}:label_cache:{prompt_version}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    @contextlib.contextmanager
    def partition_lock(self, prompt_version: str, poll_s: float = 0.5,
                       logger: logging.Logger | None = None) -> Iterator[float]:
        """Hold the partition's advisory lock; yields the seconds spent waiting for it."""
        logger = logger or log
        key = self.lock_id(prompt_version)
        conn = self.db.connect(autocommit=True)
        started = time.monotonic()
        try:
            announced = 0.0
            while not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                waited = time.monotonic() - started
                if waited >= announced:
                    holder = conn.execute(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND classid = %s AND objid = %s AND objsubid = 1",
                        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
                    logger.info("prompt version %s is being labelled by another run (Postgres pid %s); "
                                "waiting for it to finish (%.0fs so far)",
                                prompt_version, holder[0] if holder else "?", waited)
                    announced = max(30.0, announced * 2)
                time.sleep(poll_s)
            yield time.monotonic() - started
        finally:
            conn.close()  # closing the session releases the lock

    def lookup(self, prompt_version: str, hashes: Iterable[str]) -> dict[str, CachedLabel]:
        hashes = list(hashes)
        found: dict[str, CachedLabel] = {}
        with self.db.connect() as conn:
            for start in range(0, len(hashes), LOOKUP_CHUNK):
                rows = conn.execute(
                    f"SELECT {', '.join(COLUMNS)} FROM {self.table} "
                    "WHERE prompt_version = %s AND input_hash = ANY(%s)",
                    (prompt_version, hashes[start:start + LOOKUP_CHUNK])).fetchall()
                for row in rows:
                    found[row[0]] = CachedLabel(*row)
        return found

    def count(self, prompt_version: str) -> int:
        with self.db.connect() as conn:
            return conn.execute(f"SELECT count(*) FROM {self.table} WHERE prompt_version = %s",
                                (prompt_version,)).fetchone()[0]

    def sample_threshold(self, prompt_version: str, sample_size: int, salt: str, proposed: int) -> int:
        """The stored threshold of this version's sample, or `proposed` stored now (first run or new size)."""
        with self.db.connect() as conn:
            row = conn.execute(f"SELECT sample_size, salt, threshold FROM {self.samples} WHERE prompt_version = %s",
                               (prompt_version,)).fetchone()
            if row and row[0] == sample_size and row[1] == salt:
                return int(row[2])
            conn.execute(
                f"INSERT INTO {self.samples} (prompt_version, sample_size, salt, threshold) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (prompt_version) DO UPDATE SET sample_size = EXCLUDED.sample_size, "
                "salt = EXCLUDED.salt, threshold = EXCLUDED.threshold, created_at = now()",
                (prompt_version, sample_size, salt, proposed))
            conn.commit()
            return proposed


class CacheWriter:
    """Group commit of answers to the label cache, on its own async connection.

    `add()` queues an answer and returns at once; one background task commits everything queued,
    starting as soon as anything is, and answers that arrive during a commit go together into the
    next one. So an answer is durable about one commit (milliseconds) after it arrives, whatever the
    arrival rate, and the event loop never waits for Postgres. `on_durable` is called with each
    group once committed: only then does an answer count as done.

    With `capacity`, each HTTP attempt first takes a slot (`reserve()`). An attempt that brings no
    answer gives it back at once (`unreserve()`); one that brings an answer hands it to the answer
    (`add(..., holds_slot=True)`), which gives it back once committed. So attempts in flight plus
    answers not yet durable never exceed `capacity`: that is the most a kill -9 can make a re-run pay
    for again, however slow Postgres is (a stalled commit holds back new attempts instead of letting
    unsaved answers pile up).
    """

    def __init__(self, cache: LabelCache, prompt_version: str, capacity: int | None = None,
                 on_durable: Callable[[list[CachedLabel]], None] | None = None):
        self.cache = cache
        self.prompt_version = prompt_version
        self.capacity = capacity
        self.on_durable = on_durable
        self._pending: list[tuple[CachedLabel, tuple, bool]] = []  # (label, row, holds_slot), in arrival order
        self._conn: psycopg.AsyncConnection | None = None
        self._error: BaseException | None = None
        self.committed = 0
        self._sql = (
            f"INSERT INTO {cache.table} (prompt_version, input_hash, status, output, error, tokens_in, tokens_out, "
            "cost_usd, latency_ms, attempts, teacher_model, finish_reason) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (prompt_version, input_hash) DO UPDATE SET status = EXCLUDED.status, "
            "output = EXCLUDED.output, error = EXCLUDED.error, tokens_in = EXCLUDED.tokens_in, "
            "tokens_out = EXCLUDED.tokens_out, cost_usd = EXCLUDED.cost_usd, latency_ms = EXCLUDED.latency_ms, "
            "attempts = EXCLUDED.attempts, teacher_model = EXCLUDED.teacher_model, "
            "finish_reason = EXCLUDED.finish_reason, updated_at = now() "
            f"WHERE {cache.table}.status = 'failed'"  # a completed answer is never overwritten
        )

    async def __aenter__(self) -> "CacheWriter":
        try:
            # Named, so that a DBA looking at pg_stat_activity can tell it from the lookups.
            self._conn = await psycopg.AsyncConnection.connect(self.cache.db.url, application_name=WRITER_APP_NAME)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot connect to Postgres at {self.cache.db.safe_url}: {exc}") from None
        self._wake = asyncio.Event()  # set by add(): something to commit
        self._slots = asyncio.Semaphore(self.capacity) if self.capacity else None
        self._closing = False
        self._committer = asyncio.create_task(self._commit_loop())
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            # Stopped by a flag, never cancelled: a cancel in the middle of a commit would break the
            # connection, and the committer must first drain what was paid for, even when the run fails.
            self._closing = True
            self._wake.set()
            await self._committer
        finally:
            await self._conn.close()

    async def _commit_loop(self) -> None:
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                group = list(self._pending)  # dropped from the queue only once committed
                async with self._conn.cursor() as cur:
                    await cur.executemany(self._sql, [row for _, row, _ in group])
                await self._conn.commit()
                del self._pending[:len(group)]
                self.committed += len(group)
                if self.on_durable is not None:
                    self.on_durable([label for label, _, _ in group])
                self._release(sum(holds for _, _, holds in group))
        except BaseException as exc:
            self._error = exc
            self._release(self.capacity or 0)  # wake every reserve(): each raises, then passes the wake-up on
            raise

    def _release(self, n: int) -> None:
        if self._slots is not None:
            for _ in range(n):
                self._slots.release()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"answers can no longer be saved to the label cache: {self._error!r}") \
                from self._error

    async def reserve(self) -> None:
        """Take a slot for one attempt (with `capacity`); raises once a commit has failed."""
        if self._slots is not None:
            await self._slots.acquire()
        if self._error is not None:
            self._release(1)
            self._raise_if_failed()

    def unreserve(self) -> None:
        """Give back the slot of an attempt that brought no answer."""
        self._release(1)

    def add(self, label: CachedLabel, finish_reason: str | None = None, holds_slot: bool = False) -> None:
        """Queue `label` for the next commit; `holds_slot`: it keeps its attempt's slot until committed."""
        self._raise_if_failed()
        self._pending.append((label, (
            self.prompt_version, label.input_hash, label.status, label.output, label.error, label.tokens_in,
            label.tokens_out, label.cost_usd, label.latency_ms, label.attempts, label.teacher_model, finish_reason),
            holds_slot and self._slots is not None))
        self._wake.set()
