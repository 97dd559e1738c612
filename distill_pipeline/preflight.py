"""`distill check-config`: every check that can run before a pipeline run, as a list of findings.

`run_checks(cfg, config_file)` looks at the database (the source table, its mapped columns and
their types), the prompt files, a sample of the stored teacher outputs against the task schema and,
when asked, the teacher endpoint. It never raises for a user error: each problem becomes a
`Finding` naming the setting or file it concerns, and where that setting came from.

Plain Python (no Dagster): it runs in a second, before anything is materialized.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from distill_pipeline.config import PipelineConfig, _env_overrides
from distill_pipeline.masking import mask, mask_url

Level = Literal["ok", "warning", "error"]

SAMPLE_ROWS = 200
WARN_SHARE = 0.05  # stored outputs failing the task schema above this share: a warning
ERROR_SHARE = 0.5  # above this: task.fields / task.labels do not describe the table
STATEMENT_TIMEOUT_MS = 30_000  # a check must not hang on a huge table or a lock


@dataclass(frozen=True)
class Finding:
    level: Level
    subject: str  # the config key or the file the finding is about
    message: str  # one line

    def line(self) -> str:
        return f"{self.level.upper():7s} {self.subject}: {self.message}"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


class _Origins:
    """Where a setting came from, for messages: an environment variable, the file, or the default."""

    def __init__(self, config_file: Path, env: Mapping[str, str]):
        self.file = config_file
        self.overrides = _env_overrides(env)  # the same rule load_config applies
        try:
            data = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        except (OSError, yaml.YAMLError):
            data = {}
        self.data = data if isinstance(data, dict) else {}

    def __call__(self, key: str) -> str:
        vars_ = [var for k, (_, _, var) in self.overrides.items()
                 if key == k or key.startswith(k + ".") or k.startswith(key + ".")]
        if vars_:
            return "from environment variable " + " / ".join(vars_)
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return f"the default; not set in {self.file}"
            node = node[part]
        return f"set in {self.file}"


def setting_origin(key: str, config_file: Path, env: Mapping[str, str] | None = None) -> str:
    """'set in <file>', 'from environment variable X' or 'the default; not set in <file>'."""
    return _Origins(config_file, os.environ if env is None else env)(key)


def run_checks(cfg: PipelineConfig, config_file: Path, *, ping_teacher: bool = False, sample_rows: int = SAMPLE_ROWS,
               env: Mapping[str, str] | None = None) -> list[Finding]:
    """Every check that applies to `cfg` (loaded from `config_file`), in the order a run meets them."""
    env = os.environ if env is None else env
    origin = _Origins(Path(config_file), env)
    findings: list[Finding] = []
    findings += _check_database(cfg, origin, sample_rows)
    findings += _check_prompts(cfg, origin)
    findings += _check_teacher(cfg, origin, env, ping_teacher)
    return findings


# --- database: table, columns, types, stored outputs ------------------------------------------------

def _check_database(cfg: PipelineConfig, origin: _Origins, sample_rows: int) -> list[Finding]:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.config import ConfigError

    if cfg.database.url is None and not (cfg.home / "pgdata").is_dir():
        # Starting the embedded server here would create it empty: nothing to check against yet.
        return [Finding("warning", "database.url",
                        f"null in {origin.file} and DATABASE_URL is not set: the embedded Postgres under "
                        f"{cfg.home / 'pgdata'} does not exist yet, so source.table was not checked "
                        "(`distill seed-demo` creates the demo table there)")]
    try:
        db = Database.from_config(cfg)
    except ConfigError as exc:
        return [Finding("error", "database.url", f"{_one_line(exc)} ({origin('database.url')})")]
    except Exception as exc:  # the embedded server failed to start: report it, the other checks still run
        return [Finding("error", "database.url", f"the embedded Postgres under {cfg.home / 'pgdata'} did not start: "
                                                 f"{_one_line(exc)}")]

    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    # Connections come from Database.connect: the one normalized URL, its masked errors.
    engine = sa.create_engine(db.sqlalchemy_url, creator=db.connect, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            findings = [Finding("ok", "database.url", f"connected to {db.safe_url}")]
            return findings + _check_source(cfg, origin, conn, sample_rows)
    except ConnectionError as exc:
        return [Finding("error", "database.url", f"{_one_line(mask_url(str(exc)))} ({origin('database.url')})")]
    except sa.exc.OperationalError as exc:  # e.g. the statement timeout, a dropped connection
        return [Finding("error", "database.url", f"the checks' queries failed: {_one_line(mask_url(str(exc.orig)))}")]
    finally:
        engine.dispose()


def _check_source(cfg: PipelineConfig, origin: _Origins, conn, sample_rows: int) -> list[Finding]:
    import sqlalchemy as sa

    from distill_pipeline.stages.source_rows import mapping_problems

    source = cfg.source
    schema, _, name = source.table.rpartition(".")
    schema = schema or None
    inspector = sa.inspect(conn)
    with warnings.catch_warnings():  # "did not recognize type 'point'": reported below as an unknown type
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        if not inspector.has_table(name, schema=schema):
            tables = inspector.get_table_names(schema=schema) + inspector.get_view_names(schema=schema)
            where = f"schema {schema}" if schema else f"schema {inspector.default_schema_name} (the default)"
            return [Finding("error", key, f"{msg} ({origin(key)})")
                    for key, msg in mapping_problems(source, None, tables, where)]
        columns = {c["name"]: c for c in inspector.get_columns(name, schema=schema)}

    findings = [Finding("error", key, f"{msg} ({origin(key)})") for key, msg in mapping_problems(source, list(columns))]
    if findings:
        return findings
    findings.append(Finding("ok", "source.columns", f"table {source.table} has every mapped column "
                            f"({', '.join(f'{k}={v}' for k, v in source.columns.model_dump().items() if v)})"))
    is_view = name in inspector.get_view_names(schema=schema)
    findings += _check_types(cfg, origin, columns, is_view)
    if not any(f.level == "error" for f in findings):
        findings += _check_export_query(cfg, origin, conn)
    if not any(f.level == "error" for f in findings):
        findings += _check_stored_outputs(cfg, origin, conn, sample_rows)
    return findings


def _check_export_query(cfg: PipelineConfig, origin: _Origins, conn) -> list[Finding]:
    """EXPLAIN the export's own query: Postgres checks its casts, comparisons, ordering and the
    read permission, without reading a row."""
    from datetime import datetime, timezone

    import psycopg

    from distill_pipeline.stages.source_rows import build_query

    source = cfg.source
    try:
        sql = build_query(source, datetime(2000, 1, 1, tzinfo=timezone.utc))  # with the incremental WHERE
    except ValueError as exc:  # a filter on a column that is not mapped
        key = "source.min_confidence" if "min_confidence" in str(exc) else "source.prompt_versions"
        return [Finding("error", key, f"{_one_line(exc)} ({origin(key)})")]
    try:
        # The driver's own cursor, without parameters: psycopg then leaves any % in the literals alone.
        conn.connection.driver_connection.execute("EXPLAIN " + sql)
    except psycopg.Error as exc:
        return [Finding("error", "source.table", f"Postgres refuses the export query on {source.table}: "
                                                 f"{_one_line(exc)} ({origin('source.table')})")]
    return [Finding("ok", "source.table", f"the export query on {source.table} plans (columns cast, ordered, readable)")]


def _check_types(cfg: PipelineConfig, origin: _Origins, columns: dict[str, dict], is_view: bool) -> list[Finding]:
    """The column types the export depends on: it casts, compares and orders by them."""
    from sqlalchemy import types as t
    from sqlalchemy.dialects.postgresql import JSONB

    mapped = cfg.source.columns
    findings = []

    def say(level: Level, key: str, text: str) -> None:
        findings.append(Finding(level, f"source.columns.{key}", f"{text} ({origin('source.columns.' + key)})"))

    created = columns[mapped.created_at]["type"]
    label = f"source.columns.created_at={mapped.created_at!r} is {created}"
    if isinstance(created, t.Date):
        say("warning", "created_at", f"{label}: day resolution only; the watermark works, a timestamp is better")
    elif not isinstance(created, t.DateTime):
        # The export compares it with timestamptz literals and buckets rows by its UTC day.
        say("error", "created_at", f"{label}: it must be a timestamp (timestamptz or timestamp) column")
    if columns[mapped.created_at].get("nullable") and not is_view:  # a view's columns always say nullable
        say("warning", "created_at", f"source.columns.created_at={mapped.created_at!r} allows NULL; "
                                     "a row with NULL created_at stops the export (make the column NOT NULL)")

    ident = columns[mapped.id]["type"]
    label = f"source.columns.id={mapped.id!r} is {ident}"
    if isinstance(ident, t.NullType) or (isinstance(ident, t.JSON) and not isinstance(ident, JSONB)):
        # Postgres has no ordering for json, xml or geometric types: ORDER BY created_at, id fails.
        say("error", "id", f"{label}: not sortable; rows are ordered by (created_at, id), use an integer or text id")
    elif not isinstance(ident, (t.Integer, t.String, t.Uuid, t.Numeric, t.DateTime, t.Date)):
        say("warning", "id", f"{label}: unusual for an id (it is sorted and kept in the watermark); "
                             "an integer or text id is expected")

    if mapped.confidence:
        conf = columns[mapped.confidence]["type"]
        label = f"source.columns.confidence={mapped.confidence!r} is {conf}"
        if isinstance(conf, t.String):
            say("warning", "confidence", f"{label}: the export casts it to float8, which fails on any non-number text")
        elif not isinstance(conf, (t.Numeric, t.Float, t.Integer)):  # Float is no Numeric in SQLAlchemy 2.1
            say("error", "confidence", f"{label}: it must be numeric (the export casts it to float8)")
    if not findings:
        findings.append(Finding("ok", "source.columns", "column types fit: created_at is a timestamp, id is sortable"
                                + (", confidence is numeric" if mapped.confidence else "")))
    return findings


def _check_stored_outputs(cfg: PipelineConfig, origin: _Origins, conn, sample_rows: int) -> list[Finding]:
    """Parse a sample of the stored outputs with the task schema: do task.fields describe the table?"""
    import sqlalchemy as sa

    from distill_pipeline.clients.postgres import quote_ident, quote_table
    from distill_pipeline.stages.tasks import parse_output

    source, task = cfg.source, cfg.task
    task_key = "task.labels" if task.kind == "classification" else "task.fields"
    if source.columns.output is None:
        return [Finding("ok", "source.columns.output", "not mapped: there are no stored answers to check, "
                                                        "every input goes to the teacher")]
    if task.kind == "generation":
        return [Finding("ok", "task.kind", "generation: any non-empty stored text is a valid answer, "
                                           "no schema to check the stored outputs against")]
    out = quote_ident(source.columns.output)
    where, params = [f"{out} IS NOT NULL"], {"n": sample_rows}
    # The same filters as the export: the rows the pipeline will actually read.
    if source.min_confidence is not None and source.columns.confidence:
        where.append(f"{quote_ident(source.columns.confidence)} >= :min_confidence")
        params["min_confidence"] = source.min_confidence
    if source.prompt_versions and source.columns.prompt_version:
        where.append(f"{quote_ident(source.columns.prompt_version)}::text = ANY(:versions)")
        params["versions"] = list(source.prompt_versions)
    # No ORDER BY: any rows will do, and sorting a large table would make the check slow.
    sql = (f"SELECT {quote_ident(source.columns.id)} AS id, {out}::text AS output FROM {quote_table(source.table)} "
           f"WHERE {' AND '.join(where)} LIMIT :n")
    try:
        rows = conn.execute(sa.text(sql), params).all()
    except sa.exc.DBAPIError as exc:  # the export would read the same table: say why it cannot
        import psycopg

        if isinstance(exc.orig, psycopg.errors.QueryCanceled):
            return [Finding("warning", "source.table", f"sampling {sample_rows} stored outputs of {source.table} took "
                                                       f"over {STATEMENT_TIMEOUT_MS // 1000} s: not checked")]
        return [Finding("error", "source.table", f"reading {source.table} failed: {_one_line(exc.orig)} "
                                                 f"({origin('source.table')})")]
    subject = f"{task_key} vs source.columns.output"
    if not rows:
        return [Finding("warning", subject, f"table {source.table} has no non-NULL {source.columns.output!r} "
                                            "rows to check the task schema against")]
    errors: Counter = Counter()
    first_bad: dict[str, Any] = {}
    for row_id, raw in rows:
        parsed = parse_output(task, raw)
        if not parsed.ok:
            reason = re.sub(r"char \d+", "char N", parsed.error or "")  # one bucket per kind of JSON error
            errors[reason] += 1
            first_bad.setdefault(reason, row_id)
    failed = sum(errors.values())
    share = failed / len(rows)
    where_set = f"{task_key} {origin(task_key)}"
    if not failed:
        return [Finding("ok", subject, f"all {len(rows)} sampled stored outputs parse as the {task.kind} task")]
    top = "; ".join(f"{n}x {reason} (e.g. row id {first_bad[reason]!r})" for reason, n in errors.most_common(3))
    text = (f"{failed} of {len(rows)} sampled stored outputs ({share:.0%}) fail the {task.kind} task schema "
            f"({where_set}): {top}")
    if share > ERROR_SHARE:
        return [Finding("error", subject, text + f"; {task_key} do not describe column "
                                                 f"{source.columns.output!r} of {source.table}")]
    if share > WARN_SHARE:
        return [Finding("warning", subject, text)]
    return [Finding("ok", subject, text + " (few enough: curation drops them)")]


# --- prompts ------------------------------------------------------------------------------------------

def _check_prompts(cfg: PipelineConfig, origin: _Origins) -> list[Finding]:
    from distill_pipeline.stages.prompts import PROMPT_SUFFIXES, PromptError, load_prompt

    folder = cfg.prompts_dir
    if not folder.is_dir():
        return [Finding("error", "prompts_dir", f"prompts_dir={str(folder)!r} is not a folder ({origin('prompts_dir')})")]
    paths = sorted(p for p in folder.iterdir() if p.suffix in PROMPT_SUFFIXES and p.is_file())
    if not paths:
        return [Finding("error", "prompts_dir", f"no prompt files (*.yaml) in {folder} ({origin('prompts_dir')}): "
                                                "the teacher has nothing to run")]
    findings = []
    for path in paths:
        try:
            version = load_prompt(path)
        except PromptError as exc:
            findings.append(Finding("error", str(path), _one_line(exc).removeprefix(f"{path}: ")))
            continue
        if version.task_kind and version.task_kind != cfg.task.kind:
            # teacher_labels refuses such a prompt: say it now.
            findings.append(Finding("error", str(path), f"task_kind={version.task_kind!r} but task.kind is "
                                                        f"{cfg.task.kind!r} ({origin('task.kind')})"))
            continue
        findings.append(Finding("ok", str(path), f"prompt version {version.key} (teacher model {version.teacher.model})"))
    return findings


# --- teacher ------------------------------------------------------------------------------------------

def _check_teacher(cfg: PipelineConfig, origin: _Origins, env: Mapping[str, str], ping: bool) -> list[Finding]:
    teacher = cfg.teacher
    if teacher.kind == "demo":
        return [Finding("ok", "teacher.kind", "demo: the stand-in teacher is started for each labelling run"
                        + (" (nothing to ping)" if ping else ""))]
    findings = []
    key = env.get(teacher.api_key_env) or None
    if key is None:
        findings.append(Finding("warning", "teacher.api_key_env",
                                f"environment variable {teacher.api_key_env} is not set: requests go without a key "
                                f"(fine only for an endpoint without auth; {origin('teacher.api_key_env')})"))
    if ping:
        findings += _ping_teacher(cfg, origin, key)
    else:
        findings.append(Finding("ok", "teacher.base_url", f"{teacher.base_url} not asked (--ping-teacher asks it)"))
    return findings


def _teacher_models(cfg: PipelineConfig) -> set[str]:
    """The model names labelling will send: teacher.model, else each prompt file's teacher.model."""
    if cfg.teacher.model:
        return {cfg.teacher.model}
    from distill_pipeline.stages.prompts import PromptError, load_prompts

    try:
        return {v.teacher.model for v in load_prompts(cfg.prompts_dir).values()}
    except PromptError:
        return set()  # already reported by the prompt checks


def _http(method: str, url: str, key: str | None, body: dict | None, timeout: float) -> tuple[int, bytes]:
    """(status, body); raises URLError / OSError when nothing answers."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    # No proxies from the environment: the teacher client (aiohttp) does not use them either.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as resp:
            return resp.status, resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000)


def _ping_teacher(cfg: PipelineConfig, origin: _Origins, key: str | None) -> list[Finding]:
    teacher = cfg.teacher
    base = teacher.base_url
    where = f"teacher.base_url {origin('teacher.base_url')}"
    timeout = min(teacher.timeout_s, 15.0)
    models = _teacher_models(cfg)

    def hidden(text: Any) -> str:
        return _one_line(mask(str(text), key))

    def rejected(status: int, url: str) -> Finding:
        return Finding("error", "teacher.api_key_env", f"key rejected: {url} answered HTTP {status} to the key in "
                                                       f"${teacher.api_key_env} ({origin('teacher.api_key_env')})")

    try:
        status, body = _http("GET", base + "/models", key, None, timeout)
        if status in (401, 403):
            return [rejected(status, base + "/models")]
        if status == 200:
            try:
                listed = {m.get("id") for m in json.loads(body).get("data", []) if isinstance(m, dict)}
            except (ValueError, AttributeError):
                listed = set()
            missing = sorted(models - listed) if listed else []
            if missing:
                from distill_pipeline.stages.source_rows import did_you_mean

                hint = did_you_mean(missing[0], sorted(m for m in listed if m))
                return [Finding("warning", "teacher.model", f"{base}/models does not list {', '.join(missing)}"
                                f"{hint} (it lists {len(listed)} models; teacher.model {origin('teacher.model')} "
                                "or the prompt files' teacher.model)")]
            return [Finding("ok", "teacher.base_url", f"{base} answered /models"
                            + (f" and lists {', '.join(sorted(models))}" if listed and models else ""))]
        if status not in (404, 405):
            return [Finding("error", "teacher.base_url", f"{base}/models answered HTTP {status}: "
                                                         f"{hidden(body[:200].decode(errors='replace'))} ({where})")]
        # No /models on this server: one tiny chat completion instead (max_tokens 1).
        model = sorted(models)[0] if models else "ping"
        status, body = _http("POST", base + "/chat/completions", key,
                             {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]},
                             timeout)
        if status in (401, 403):
            return [rejected(status, base + "/chat/completions")]
        if status != 200:
            return [Finding("error", "teacher.base_url", f"{base}/chat/completions (model {model}) answered HTTP "
                                                         f"{status}: {hidden(body[:200].decode(errors='replace'))} "
                                                         f"({where})")]
        return [Finding("ok", "teacher.base_url", f"{base} answered a 1-token chat completion with model {model}")]
    except (urllib.error.URLError, OSError) as exc:  # refused, DNS, TLS, timeout
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return [Finding("error", "teacher.base_url", f"{base} is unreachable: {hidden(reason)} ({where})")]
