"""`distill check-config` against a real Postgres: a team's own table and column names, misspelled
columns and prompt keys, stored outputs that do not fit the task, SQLAlchemy-style URLs, and the
CLI's one-line errors (no traceback) for user mistakes."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml

from distill_pipeline.clients.postgres import Database, normalize_url
from distill_pipeline.config import ConfigError, load_config
from distill_pipeline.preflight import run_checks

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-pw-123"  # the test servers trust local connections: the password is ignored, never printed

TASK = {"kind": "extraction", "skip_key": "skip", "label_field": "sentiment",
        "fields": {"sentiment": {"enum": ["positive", "negative"]}, "topic": {"type": "string"}}}
COLUMNS = {"id": "answer_id", "input": "question", "output": "teacher_json", "confidence": "score",
           "prompt_version": "rubric", "created_at": "logged_at"}
PROMPT = {"task_kind": "extraction", "teacher": {"model": "demo-teacher", "max_tokens": 64},
          "system": "Return sentiment and topic as JSON.", "user_template": "Ticket: {input}"}
GOOD_ROWS, BAD_ROWS = 40, 1  # one malformed stored answer (2%): below the warning share


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """`url` in the form teams keep it: postgresql+<driver>://user:password@..."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(scheme=f"postgresql+{driver}", netloc=f"{user}:{PASSWORD}@{host}"))


@pytest.fixture()
def team_db(db_url) -> str:
    """A team's table with its own names, in its own schema; returns the URL in SQLAlchemy form."""
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE SCHEMA support")
        conn.execute("""CREATE TABLE support.answers (
            answer_id bigint PRIMARY KEY, question text, teacher_json jsonb, score real, rubric text,
            logged_at timestamptz NOT NULL, meta json)""")
        rows = [(i, f"ticket number {i} about billing", json.dumps(
                    {"sentiment": "positive" if i % 2 else "negative", "topic": "billing"}), 9.0)
                for i in range(1, GOOD_ROWS + 1)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO support.answers VALUES (%s, %s, %s, %s, 'r1', "
                            "timestamptz '2026-03-01' + %s * interval '1 hour', '{}')",
                            [(*r, r[0]) for r in rows])
            # jsonb cannot hold a truncated answer: this one is a JSON string, not an object
            cur.execute("INSERT INTO support.answers VALUES (999, 'cut off', '\"{\\\"sentiment\\\": \"', 9, 'r1', "
                        "timestamptz '2026-03-05', '{}')")
    return sqlalchemy_url(db_url)


def write_setup(tmp_path: Path, *, columns: dict | None = None, table: str = "support.answers",
                task: dict | None = None, prompt: dict | None = None, teacher: dict | None = None) -> Path:
    prompts = tmp_path / "prompts"
    prompts.mkdir(exist_ok=True)
    (prompts / "support_v1.yaml").write_text(yaml.safe_dump(prompt or PROMPT))
    config = tmp_path / "team.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(tmp_path / "home"), "prompts_dir": "prompts",
        "source": {"table": table, "columns": columns or COLUMNS},
        "task": task or TASK, "teacher": teacher or {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
    }, sort_keys=False))
    return config


def distill(config: Path, database_url: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("DISTILL") and k not in ("DATABASE_URL", "DAGSTER_HOME")}
    return subprocess.run([sys.executable, "-m", "distill_pipeline.cli", "--config", str(config), *args],
                          cwd=config.parent, env={**base, "DATABASE_URL": database_url, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def finding_lines(proc: subprocess.CompletedProcess, level: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(level.upper())]


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: "), proc.stderr
    return lines[0]


def test_correct_config_passes_with_a_sqlalchemy_url(team_db, tmp_path):
    config = write_setup(tmp_path)
    proc = distill(config, team_db, "check-config")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert finding_lines(proc, "error") == []
    assert "check-config: 0 error(s)" in proc.stdout
    ok = "\n".join(finding_lines(proc, "ok"))
    assert "table support.answers has every mapped column" in ok
    assert "column types fit" in ok
    assert "the export query on support.answers plans" in ok
    assert f"{BAD_ROWS} of {GOOD_ROWS + BAD_ROWS} sampled stored outputs" in ok  # the one bad row is seen, tolerated
    assert "support_v1.yaml" in ok
    # the one warning: no API key in the environment for an openai teacher
    assert [line.split(":")[0] for line in finding_lines(proc, "warning")] == ["WARNING teacher.api_key_env"]
    assert '"table": "support.answers"' in proc.stdout  # the validated config is printed too
    assert PASSWORD not in proc.stdout + proc.stderr


def test_misspelled_column_names_the_key_the_file_and_the_real_column(team_db, tmp_path):
    config = write_setup(tmp_path, columns={**COLUMNS, "input": "qestion"})
    proc = distill(config, team_db, "check-config")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    [line] = finding_lines(proc, "error")
    assert line.startswith("ERROR   source.columns.input:")
    assert "'qestion'" in line and "did you mean 'question'?" in line and f"set in {config}" in line
    assert "check-config: 1 error(s)" in proc.stdout

    # the export refuses the same mapping in one line, naming the setting and the file
    line = assert_one_line_error(distill(config, team_db, "export"))
    assert "source.columns.input='qestion'" in line and "did you mean 'question'?" in line and str(config) in line

    # set from the environment instead: the variable is named, not the file
    fixed = write_setup(tmp_path)
    proc = distill(fixed, team_db, "check-config", env={"DISTILL__SOURCE__COLUMNS__CREATED_AT": "loged_at"})
    [line] = finding_lines(proc, "error")
    assert line.startswith("ERROR   source.columns.created_at:") and "did you mean 'logged_at'?" in line
    assert "from environment variable DISTILL__SOURCE__COLUMNS__CREATED_AT" in line


def test_missing_table_suggests_the_close_one(team_db, tmp_path):
    config = write_setup(tmp_path, table="support.answer")
    proc = distill(config, team_db, "check-config")
    assert proc.returncode == 1
    [line] = finding_lines(proc, "error")
    assert line.startswith("ERROR   source.table:") and "did you mean 'answers'?" in line and str(config) in line
    line = assert_one_line_error(distill(config, team_db, "export"))
    assert "source.table='support.answer'" in line and "did you mean 'answers'?" in line


def test_column_types_that_break_the_export_are_errors(team_db, tmp_path):
    # created_at on a text column, id on a json column (Postgres cannot sort json)
    config = write_setup(tmp_path, columns={**COLUMNS, "created_at": "rubric", "id": "meta"})
    proc = distill(config, team_db, "check-config")
    assert proc.returncode == 1
    errors = finding_lines(proc, "error")
    assert any(e.startswith("ERROR   source.columns.created_at:") and "must be a timestamp" in e for e in errors)
    assert any(e.startswith("ERROR   source.columns.id:") and "not sortable" in e for e in errors)


def test_a_table_the_user_may_not_read(team_db, tmp_path, db_url):
    role = "r_" + uuid.uuid4().hex[:10]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA support TO {role}")  # sees the table, may not SELECT from it
    try:
        parts = urlsplit(db_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@" + parts.netloc.rpartition("@")[2]))
        proc = distill(write_setup(tmp_path), url, "check-config")
        assert proc.returncode == 1
        [line] = finding_lines(proc, "error")
        assert line.startswith("ERROR   source.table:") and "permission denied" in line
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON SCHEMA support FROM {role}")
            conn.execute(f"DROP ROLE {role}")


def test_misspelled_prompt_key_is_named_and_prompts_exits_in_one_line(team_db, tmp_path):
    prompt = {**PROMPT}
    prompt["sytem"] = prompt.pop("system")
    config = write_setup(tmp_path, prompt=prompt)
    proc = distill(config, team_db, "check-config")
    assert proc.returncode == 1
    [line] = finding_lines(proc, "error")
    prompt_file = tmp_path / "prompts" / "support_v1.yaml"
    assert line.startswith(f"ERROR   {prompt_file}:") and "sytem" in line

    line = assert_one_line_error(distill(config, team_db, "prompts"))
    assert str(prompt_file) in line and "sytem" in line


def test_stored_outputs_that_do_not_fit_the_task(team_db, tmp_path):
    # the config describes another task: every stored answer lacks `label`
    task = {"kind": "extraction", "fields": {"label": {"enum": ["spam", "ham"]}}}
    config = write_setup(tmp_path, task=task)
    proc = distill(config, team_db, "check-config")
    assert proc.returncode == 1
    [line] = finding_lines(proc, "error")
    assert line.startswith("ERROR   task.fields vs source.columns.output:")
    assert "41 of 41 sampled stored outputs (100%)" in line and "missing field 'label'" in line
    assert "do not describe column 'teacher_json'" in line and str(config) in line

    # the right task, but a share of answers broken: a warning, not an error
    with psycopg.connect(normalize_url(team_db)) as conn:
        conn.execute("""UPDATE support.answers SET teacher_json = '{"sentiment": "meh", "topic": "x"}'
                        WHERE answer_id <= 6""")
    proc = distill(write_setup(tmp_path), team_db, "check-config")
    assert proc.returncode == 0, proc.stdout[-3000:]
    [line] = [w for w in finding_lines(proc, "warning") if "stored outputs" in w]
    assert "7 of 41" in line and "6x field 'sentiment'='meh' is not one of" in line and "row id" in line


@pytest.mark.parametrize("form", ["postgresql+psycopg", "postgresql+psycopg2", "postgres"])
def test_export_takes_the_url_forms_teams_have(team_db, tmp_path, form):
    url = team_db.replace("postgresql+psycopg://", f"{form}://", 1)
    proc = distill(write_setup(tmp_path), url, "export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["rows_total"] == GOOD_ROWS + BAD_ROWS
    assert PASSWORD not in proc.stdout + proc.stderr
    assert Database(url).sqlalchemy_url.startswith("postgresql+psycopg://")


def test_url_normalisation():
    assert normalize_url("postgresql+psycopg2://u:p@h:5/d?sslmode=require") == "postgresql://u:p@h:5/d?sslmode=require"
    assert normalize_url(" postgres://u@h/d ") == "postgresql://u@h/d"
    assert normalize_url("host=/tmp dbname=x") == "host=/tmp dbname=x"  # libpq keyword form stays
    with pytest.raises(ConfigError, match=r"mysql\+pymysql:// is not a Postgres URL") as err:
        normalize_url("mysql+pymysql://u:hunter2@h/d")
    assert "hunter2" not in str(err.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_database_is_one_line_with_the_password_masked(tmp_path):
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{_closed_port()}/nowhere"
    config = write_setup(tmp_path)
    proc = distill(config, url, "check-config")
    assert proc.returncode == 1
    [line] = finding_lines(proc, "error")
    assert line.startswith("ERROR   database.url: cannot connect") and "from environment variable DATABASE_URL" in line
    line = assert_one_line_error(distill(config, url, "export"))
    assert "cannot connect to Postgres at postgresql://postgres:***@127.0.0.1" in line
    assert PASSWORD not in proc.stdout + proc.stderr + line


def test_missing_upstream_artifact_is_one_line(team_db, tmp_path):
    line = assert_one_line_error(distill(write_setup(tmp_path), team_db, "split", "support_v1-00000000"))
    assert "support_v1-00000000" in line


class _Rejecting(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b'{"error": {"message": "Incorrect API key provided"}}')

    def log_message(self, *args):
        pass


def test_ping_teacher(team_db, tmp_path):
    from distill_pipeline.demo.teacher_server import start_teacher_server

    def teacher_findings(teacher: dict, env: dict) -> list:
        config = write_setup(tmp_path, teacher=teacher)
        cfg = load_config(config, env={"DATABASE_URL": team_db})
        return [f for f in run_checks(cfg, config, ping_teacher=True, env=env) if f.subject.startswith("teacher")]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Rejecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        [f] = teacher_findings({"kind": "openai", "base_url": base, "api_key_env": "TEAM_KEY"},
                               {"TEAM_KEY": "sk-wrong-key-42"})
        assert f.level == "error" and f.subject == "teacher.api_key_env" and "key rejected" in f.message
        assert "HTTP 401" in f.message and "$TEAM_KEY" in f.message and "sk-wrong-key-42" not in f.message
    finally:
        server.shutdown()

    [f] = teacher_findings({"kind": "openai", "base_url": f"http://127.0.0.1:{_closed_port()}/v1",
                            "api_key_env": "TEAM_KEY"}, {"TEAM_KEY": "k"})
    assert f.level == "error" and f.subject == "teacher.base_url" and "unreachable" in f.message

    with start_teacher_server(port=0) as handle:
        [f] = teacher_findings({"kind": "openai", "base_url": handle.url, "model": "demo-teacher",
                                "api_key_env": "TEAM_KEY"}, {"TEAM_KEY": "k"})
        assert f.level == "ok" and "lists demo-teacher" in f.message, f
        [f] = teacher_findings({"kind": "openai", "base_url": handle.url, "model": "demo-teachr",
                                "api_key_env": "TEAM_KEY"}, {"TEAM_KEY": "k"})
        assert f.level == "warning" and "did you mean 'demo-teacher'?" in f.message, f

    [f] = teacher_findings({"kind": "demo"}, {})
    assert f.level == "ok" and "nothing to ping" in f.message

    # through the CLI flag: the unreachable teacher makes check-config fail
    config = write_setup(tmp_path, teacher={"kind": "openai", "base_url": f"http://127.0.0.1:{_closed_port()}/v1"})
    proc = distill(config, team_db, "check-config", "--ping-teacher")
    assert proc.returncode == 1 and any("teacher.base_url" in e and "unreachable" in e
                                        for e in finding_lines(proc, "error"))
    assert distill(config, team_db, "check-config").returncode == 0  # without the flag it is not asked
