"""source_rows: stream the team's table of teacher outputs out of Postgres into Parquet.

Layout under the stage folder:
    day=YYYY-MM-DD/part-00000.parquet ...   one folder per UTC day of created_at
    manifest.json                           watermark, files, counts (written last)

Each run re-reads every day from the day of (watermark - overlap) on, ordered by
(created_at, id), and rewrites those day folders whole. So the shard set is a
pure function of the table: a rerun with no new rows gives identical files, rows
committed late with an earlier created_at inside the overlap are picked up, and
a run killed half way leaves the previous manifest and complete day folders, so
the next run redoes exactly the same range.

Rows are read through ADBC (Postgres COPY binary -> Arrow batches): memory is
bounded by one batch and one open Parquet writer, whatever the table size.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.clients.postgres import ArrowSource, Database, quote_ident, quote_table
from distill_pipeline.clients.tracking import file_sha256
from distill_pipeline.config import ConfigError, PipelineConfig, SourceConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
US_PER_DAY = 86_400_000_000
ROW_GROUP_ROWS = 32_768
BATCH_BYTES = 4 << 20  # per ADBC batch; with a queue of 2 per stream this bounds memory
CANONICAL = ("id", "input", "output", "confidence", "prompt_version", "created_at")


@dataclass
class ExportResult:
    rows_read: int
    rows_total: int
    bytes_total: int
    days_rewritten: list[str]
    watermark: dict | None
    since: str | None
    seconds: float
    shards: int
    # Digest of every exported file's content: equal across two exports exactly when no row changed, so
    # the nightly refresh can skip a night without new rows.
    data_version: str
    manifest_path: str
    files: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds else 0.0

    def metadata(self) -> dict:
        return {"rows_read": self.rows_read, "rows_total": self.rows_total, "bytes_total": self.bytes_total,
                "shards": self.shards, "days_rewritten": len(self.days_rewritten), "watermark": self.watermark or {},
                "reread_from": self.since or "start", "duration_s": round(self.seconds, 3),
                "rows_per_s": round(self.rows_per_s), "data_version": self.data_version,
                "manifest_path": self.manifest_path}


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def build_query(source: SourceConfig, since: datetime | None, until: datetime | None = None, *,
                ordered: bool = True) -> str:
    """The export SELECT (`ordered=False`: without the ORDER BY, for counting its rows). Identifiers were
    validated by the config; values are ours or escaped."""
    c = source.columns

    def col(name: str | None, alias: str, cast: str = "") -> str:
        if name is None:
            return f"NULL{cast or '::text'} AS {alias}"
        return f"{quote_ident(name)}{cast} AS {alias}"

    select = ", ".join([
        col(c.id, "id"),
        col(c.input, "input"),
        col(c.output, "output", "::text" if c.output else ""),
        col(c.confidence, "confidence", "::float8"),
        col(c.prompt_version, "prompt_version", "::text" if c.prompt_version else ""),
        col(c.created_at, "created_at", "::timestamptz"),
    ])
    where = []
    if since is not None:
        where.append(f"{quote_ident(c.created_at)} >= {_sql_literal(since.isoformat())}::timestamptz")
    if until is not None:
        where.append(f"{quote_ident(c.created_at)} < {_sql_literal(until.isoformat())}::timestamptz")
    if source.min_confidence is not None:
        if c.confidence is None:
            raise ValueError("source.min_confidence is set but source.columns.confidence is null")
        where.append(f"{quote_ident(c.confidence)} >= {float(source.min_confidence)!r}")
    if source.prompt_versions:
        if c.prompt_version is None:
            raise ValueError("source.prompt_versions is set but source.columns.prompt_version is null")
        values = ", ".join(_sql_literal(v) for v in source.prompt_versions)
        where.append(f"{quote_ident(c.prompt_version)} IN ({values})")
    sql = f"SELECT {select} FROM {quote_table(source.table)}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + (f" ORDER BY {quote_ident(c.created_at)}, {quote_ident(c.id)}" if ordered else "")


class SourceTableError(ConfigError):
    """source.table or a source.columns entry names something the database does not have.

    `setting` is the config key, so the CLI can add where it was set (the file or a variable)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def did_you_mean(name: str, candidates: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidates, case-insensitively; '' when none is close."""
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(by_lower[c]) for c in close)}?)" if close else ""


def mapping_problems(source: SourceConfig, table_columns: list[str] | None, tables: list[str] = (),
                     where: str = "the database") -> list[tuple[str, str]]:
    """(setting, message) for the table missing (`table_columns` None; `tables`: names to suggest from)
    or for each mapped column it lacks. Shared by the export and `distill check-config`."""
    if table_columns is None:
        return [("source.table", f"source.table={source.table!r}: no such table or view in {where}"
                 + did_you_mean(source.table.split(".")[-1], list(tables)))]
    listed = ", ".join(table_columns[:30]) + (f", ... ({len(table_columns) - 30} more)" if len(table_columns) > 30 else "")
    problems = []
    for key, column in source.columns.model_dump().items():
        if column is not None and column not in table_columns:
            problems.append((f"source.columns.{key}",
                             f"source.columns.{key}={column!r}: table {source.table} has no such column"
                             + did_you_mean(column, table_columns) + f"; its columns are {listed}"))
    return problems


def _check_source_table(db: Database, source: SourceConfig) -> None:
    """Fail before reading with the setting named, instead of Postgres' error deep inside the read."""
    with db.connect() as conn:
        # to_regclass resolves the name exactly as the export query does (search_path, quoting).
        oid = conn.execute("SELECT to_regclass(%s)::oid", (quote_table(source.table),)).fetchone()[0]
        if oid is None:
            schema = source.table.split(".")[0] if "." in source.table else None
            tables = [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = coalesce(%s, current_schema()) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')",
                (schema,))]
            columns = None
        else:
            tables = []
            columns = [r[0] for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
                "ORDER BY attnum", (oid,))]
    problems = mapping_problems(source, columns, tables)
    if problems:
        setting, first = problems[0]
        more = f" (and {len(problems) - 1} more: {', '.join(k for k, _ in problems[1:])})" if len(problems) > 1 else ""
        raise SourceTableError(setting, first + more)


def query_fingerprint(source: SourceConfig) -> str:
    """What makes two exports comparable: a changed mapping or filter restarts from scratch."""
    keep = source.model_dump(include={"table", "columns", "min_confidence", "prompt_versions"})
    return json.dumps(keep, sort_keys=True)


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def data_version(files: list[dict]) -> str:
    """One digest of the export's content (file paths and their digests), the same for the same rows."""
    joined = "\n".join(f"{f['path']} {f['sha256']}" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class _DayWriter:
    """Writes one day's rows into part files of at most `shard_rows` rows.

    Rows are regrouped into row groups of exactly `group_rows` (the last one
    shorter), so the bytes of a file depend only on its rows, never on how the
    database happened to cut its batches: a rerun gives identical files.
    """

    def __init__(self, folder: Path, shard_rows: int, schema: pa.Schema):
        self.folder, self.schema = folder, schema
        self.group_rows = min(ROW_GROUP_ROWS, shard_rows)
        self.shard_rows = shard_rows // self.group_rows * self.group_rows
        self.folder.mkdir(parents=True)
        self.files: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def _write_group(self, group: pa.Table) -> None:
        if self._writer is None or self.files[-1]["rows"] >= self.shard_rows:
            if self._writer is not None:
                self._writer.close()
            path = self.folder / f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema, compression="lz4", use_dictionary=["prompt_version"],
                                            write_statistics=["created_at", "id"])
            self.files.append({"name": path.name, "rows": 0})
        self._writer.write_table(group, row_group_size=self.group_rows)
        self.files[-1]["rows"] += group.num_rows

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.group_rows:
            merged = pa.concat_tables(self._pending).combine_chunks()
            full = merged.num_rows // self.group_rows * self.group_rows
            for offset in range(0, full, self.group_rows):
                self._write_group(merged.slice(offset, self.group_rows))
            rest = merged.slice(full)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self._pending_rows:
            self._write_group(pa.concat_tables(self._pending).combine_chunks())
            self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _DaySink:
    """Splits a sorted stream of batches by UTC day of created_at into _DayWriters."""

    def __init__(self, staging: Path, shard_rows: int):
        self.staging, self.shard_rows = staging, shard_rows
        self.writers: dict[str, _DayWriter] = {}
        self.rows, self.last_row, self.schema = 0, None, None

    def write(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch])
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        days = _day_numbers(table.column("created_at").combine_chunks())
        bounds = np.flatnonzero(np.diff(days)) + 1
        for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(days)]])):
            name = _day_name(days[s])
            if name not in self.writers:
                for earlier in self.writers.values():  # sorted input: earlier days are complete
                    earlier.close()
                self.writers[name] = _DayWriter(self.staging / f"day={name}", self.shard_rows, self.schema)
            self.writers[name].write(table.slice(s, e - s))
        self.rows += table.num_rows
        self.last_row = (table.column("created_at")[-1].as_py(), table.column("id")[-1].as_py())

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _pipe(items: Iterator, consume, depth: int) -> None:
    """Run `consume` on each item in a second thread while the producer keeps going (bounded queue)."""
    done = object()
    queue: Queue = Queue(maxsize=depth)
    failure: list[BaseException] = []

    def worker() -> None:
        while (item := queue.get()) is not done:
            if not failure:
                try:
                    consume(item)
                except BaseException as exc:  # re-raised in the producer thread
                    failure.append(exc)

    thread = threading.Thread(target=worker, name="export-writer", daemon=True)
    thread.start()
    try:
        for item in items:
            if failure:
                break
            queue.put(item)
    finally:
        queue.put(done)
        thread.join()
    if failure:
        raise failure[0]


def _day_name(day_number: int) -> str:
    return (datetime(1970, 1, 1) + timedelta(days=int(day_number))).date().isoformat()


def _day_numbers(created_at: pa.Array) -> np.ndarray:
    if created_at.null_count:
        raise ValueError("source rows with NULL created_at cannot be exported incrementally "
                         "(source.columns.created_at must be NOT NULL)")
    micros = created_at.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    # Straight from the buffer: Array.to_numpy() imports pandas (0.28 s here, in every run process).
    values = np.frombuffer(micros.buffers()[1], dtype=np.int64)[micros.offset: micros.offset + len(micros)]
    return values // US_PER_DAY


def _iter_batches(source: ArrowSource, sql: str, batch_bytes: int) -> Iterator[pa.RecordBatch]:
    with source.batches(sql, batch_bytes) as reader:
        for batch in reader:
            if batch.num_rows:
                yield batch


def _split_days(db: Database, source: SourceConfig, since: datetime | None) -> list[tuple]:
    """Cut [since, end) into `parallel_streams` ranges of whole UTC days (one range when 1)."""
    if source.parallel_streams == 1:
        return [(since, None)]
    col = quote_ident(source.columns.created_at)
    sql = f"SELECT min({col}), max({col}) FROM {quote_table(source.table)}"
    if since is not None:
        sql += f" WHERE {col} >= {_sql_literal(since.isoformat())}::timestamptz"
    with db.connect() as conn:
        lo, hi = conn.execute(sql).fetchone()
    if lo is None:
        return [(since, None)]
    first = lo.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    n_days = (hi.astimezone(timezone.utc).date() - first.date()).days + 1
    k = min(source.parallel_streams, n_days)
    cuts = [first + timedelta(days=round(i * n_days / k)) for i in range(1, k)]
    return list(zip([since] + cuts, cuts + [None]))


def _export_bar(db: Database, source: SourceConfig, since: datetime | None):
    """The export's progress bar (distill_pipeline.console); its total is counted only when a bar is shown."""
    from distill_pipeline.console import progress_bar, shows_progress

    total = None
    if shows_progress():
        with db.connect() as conn:
            total = conn.execute(f"SELECT count(*) FROM ({build_query(source, since, ordered=False)}) AS q"
                                 ).fetchone()[0]
    return progress_bar("source_rows export", total=total, unit="rows")


def build_source_rows(cfg: PipelineConfig, db: Database) -> ExportResult:
    """The stage: rows past the watermark exported from the team's table into <home>/artifacts/source_rows."""
    return export_source_rows(db, cfg.source, cfg.stage_dir("source_rows"))


def export_source_rows(db: Database, source: SourceConfig, stage_dir: Path) -> ExportResult:
    """Export rows past the stored watermark (minus the overlap) into day-bucketed Parquet shards."""
    started = time.perf_counter()
    stage_dir.mkdir(parents=True, exist_ok=True)
    for leftover in stage_dir.glob(".staging-*"):  # from a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in stage_dir.glob(".trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)

    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("query") != query_fingerprint(source):
        log.warning("source mapping or filters changed since the last export: exporting the whole table again")
        manifest = None
    since = None
    if manifest and manifest.get("watermark"):
        mark = datetime.fromisoformat(manifest["watermark"]["created_at"])
        start = mark - timedelta(seconds=source.overlap_seconds)
        since = datetime(start.year, start.month, start.day, tzinfo=timezone.utc)  # whole days are rewritten

    _check_source_table(db, source)
    staging = stage_dir / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    ranges = _split_days(db, source, since)
    sinks = [_DaySink(staging, source.shard_rows) for _ in ranges]
    bar = _export_bar(db, source, since)
    bar_lock = threading.Lock()

    def writer(sink: _DaySink):
        def write(batch: pa.RecordBatch) -> None:
            sink.write(batch)
            with bar_lock:  # several streams advance the one bar
                bar.update(batch.num_rows)
        return write

    gc_was_enabled = gc.isenabled()
    gc.disable()  # the stream allocates no cycles; collections only stall the GIL (~7% of the run)
    try:
        # Each stream: ADBC reading (C++, no GIL) and Parquet writing overlap in two threads;
        # streams cover disjoint day ranges, so they never write the same folder.
        with db.arrow_source() as arrow, ThreadPoolExecutor(max_workers=len(ranges)) as pool:
            futures = [pool.submit(_pipe, _iter_batches(arrow, build_query(source, lo, hi), BATCH_BYTES),
                                   writer(sink), 2) for (lo, hi), sink in zip(ranges, sinks)]
            for future in futures:
                future.result()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
        for sink in sinks:
            sink.close()
        if gc_was_enabled:
            gc.enable()
    writers = {day: w for sink in sinks for day, w in sink.writers.items()}
    rows_read = sum(sink.rows for sink in sinks)
    last_row = next((sink.last_row for sink in reversed(sinks) if sink.last_row is not None), None)
    schema = next((sink.schema for sink in sinks if sink.schema is not None), None)

    days = dict(manifest["days"]) if manifest else {}
    if since is not None:
        # Days inside the re-read range that no longer have rows (deleted upstream) are dropped.
        first_day = since.date().isoformat()
        for day in [d for d in days if d >= first_day and d not in writers]:
            shutil.rmtree(stage_dir / f"day={day}", ignore_errors=True)
            del days[day]
    elif manifest is None:
        for old in stage_dir.glob("day=*"):
            shutil.rmtree(old, ignore_errors=True)
    for day, writer in writers.items():
        final = stage_dir / f"day={day}"
        if final.exists():
            trash = stage_dir / f".trash-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(writer.folder, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(writer.folder, final)
        files = [{"path": f"day={day}/{f['name']}", "rows": f["rows"], "bytes": (final / f["name"]).stat().st_size,
                  "sha256": file_sha256(final / f["name"])} for f in writer.files]
        days[day] = {"rows": sum(f["rows"] for f in files), "files": files}
    shutil.rmtree(staging, ignore_errors=True)

    watermark = manifest.get("watermark") if manifest else None
    if last_row is not None:
        ts, row_id = last_row
        watermark = {"created_at": ts.astimezone(timezone.utc).isoformat(), "id": row_id}
    all_files = [f for d in sorted(days) for f in days[d]["files"]]
    for f in all_files:  # manifests written before digests were kept
        f.setdefault("sha256", file_sha256(stage_dir / f["path"]))
    new_manifest = {
        "format": 1,
        "table": source.table,
        "query": query_fingerprint(source),
        "watermark": watermark,
        "days": dict(sorted(days.items())),
        "rows": sum(f["rows"] for f in all_files),
        "bytes": sum(f["bytes"] for f in all_files),
        "schema": schema.to_string() if schema is not None else (manifest or {}).get("schema"),
        "data_version": data_version(all_files),
    }
    _write_json_atomic(stage_dir / MANIFEST, new_manifest)
    return ExportResult(
        rows_read=rows_read,
        rows_total=new_manifest["rows"],
        bytes_total=new_manifest["bytes"],
        days_rewritten=sorted(writers),
        watermark=watermark,
        since=since.isoformat() if since else None,
        seconds=time.perf_counter() - started,
        shards=len(all_files),
        data_version=new_manifest["data_version"],
        manifest_path=str(stage_dir / MANIFEST),
        files=[f["path"] for f in all_files],
    )


def source_files(stage_dir: Path) -> list[Path]:
    """The shard files of the last completed export (never a half-written one)."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"no export found under {stage_dir}: materialize source_rows first")
    return [stage_dir / f["path"] for d in manifest["days"].values() for f in d["files"]]


def read_source_rows(cfg: PipelineConfig, columns: list[str] | None = None) -> pa.Table:
    """All exported rows (optionally only some columns), in (created_at, id) order."""
    stage_dir = cfg.stage_dir("source_rows")
    files = source_files(stage_dir)
    if not files:
        return pa.table({c: pa.array([], pa.null()) for c in (columns or CANONICAL)})
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


def result_dict(result: ExportResult) -> dict:
    out = asdict(result)
    out.pop("files")
    return out
