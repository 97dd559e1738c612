"""The deployment files, read by the tools that read them in production, and the compose's services run here.

- the two Dagster instance files (distill_pipeline/dagster.yaml, docker/dagster.yaml): Dagster's own schema,
  a real instance from each (SQLite under a temporary DAGSTER_HOME; Postgres), and the run-queue daemon's and
  the retry policy's own decisions on runs in that instance;
- the workspaces: Dagster's workspace loader;
- the Dockerfiles: the BuildKit parser (the `dockerfile` package), every COPY source present and not excluded
  by the Dockerfile's .dockerignore;
- docker/docker-compose.yml: the Compose Specification's JSON schema (shipped by check-jsonschema), and its
  ports, commands, paths and variables against the images and docker/env.example;
- the services themselves: each command and healthcheck of the compose, run as processes here (service
  names -> 127.0.0.1, container ports -> free ports, container paths -> a temporary folder) against a real
  Postgres prepared by docker/postgres-init.sh, started in depends_on order.

Every checker is also shown a broken copy, so it can fail.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import importlib.resources
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import dockerfile
import jsonschema
import psycopg
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from distill_pipeline_tests.conftest import REPO

DOCKER = REPO / "docker"
LOCAL_INSTANCE = REPO / "distill_pipeline" / "dagster.yaml"
PROD_INSTANCE = DOCKER / "dagster.yaml"
COMPOSE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / "env.example"
DOCKERFILES = ["Dockerfile", "Dockerfile.dagster", "Dockerfile.mlflow"]
CODE_SERVICE, WEB_SERVICE, DAEMON_SERVICE = "dagster-code", "dagster-webserver", "dagster-daemon"
DAGSTER_SERVICES = (CODE_SERVICE, WEB_SERVICE, DAEMON_SERVICE)
EXPECTED_TAG_LIMITS = [
    {"key": "distill/trigger", "value": "prompt-version-sensor", "limit": 2},
    {"key": "dagster/backfill", "limit": 2},
]


# ---------------------------------------------------------------- Postgres, as the fixtures give it

@dataclass(frozen=True)
class PgServer:
    host: str  # "" for a Unix socket: libpq then takes the socket folder from PGHOST
    port: int
    user: str
    password: str
    socket_dir: str | None

    @classmethod
    def from_url(cls, url: str) -> "PgServer":
        parts = urlsplit(url)
        sock = parse_qs(parts.query).get("host", [None])[0]
        return cls(host="" if sock else (parts.hostname or "127.0.0.1"), port=parts.port or 5432,
                   user=unquote(parts.username or "postgres"), password=unquote(parts.password or ""),
                   socket_dir=sock)

    def libpq_env(self) -> dict[str, str]:
        env = {"PGHOST": self.socket_dir or self.host, "PGPORT": str(self.port)}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def pg_bin(name: str) -> str:
    """psql/pg_isready from PATH, else the client binaries the pgserver wheel ships (a fresh CI machine)."""
    found = shutil.which(name)
    if found:
        return found
    import pgserver._commands

    return str(pgserver._commands.POSTGRES_BIN_PATH / name)


# ---------------------------------------------------------------- Dagster instance files

def instance_config(path: Path) -> dict:
    """The file validated by Dagster's own loader of dagster.yaml (schema, storage and concurrency rules)."""
    from dagster._core.instance.config import dagster_instance_config

    value, custom_class = dagster_instance_config(str(path.parent), config_filename=path.name)
    assert custom_class is None
    return dict(value)


def env_names(node) -> set[str]:
    """The variables a Dagster config reads through `{env: NAME}`."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            return {node["env"]}
        return set().union(*(env_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(env_names(v) for v in node)) if node else set()
    return set()


def check_queue_and_retry_settings(instance) -> None:
    from dagster._core.instance.config import PoolGranularity
    from dagster._core.run_coordinator import QueuedRunCoordinator

    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    concurrency = instance.get_concurrency_config()
    queue = concurrency.run_queue_config
    assert queue.max_concurrent_runs == 4
    assert [dict(t) for t in queue.tag_concurrency_limits] == EXPECTED_TAG_LIMITS
    assert concurrency.pool_config.default_pool_limit == 1
    assert concurrency.pool_config.pool_granularity == PoolGranularity.OP
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
    assert instance.run_retries_retry_on_asset_or_op_failure is False
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300


def _add_run(instance, status, tags=None, **fields):
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.utils import make_new_run_id

    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin

    # a queued run names where it will be launched: the compose's code location
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(
        GrpcServerCodeLocationOrigin(host=CODE_SERVICE, port=4000, location_name="distill_pipeline"),
        "__repository__"), "refresh_prompt_version")
    run = DagsterRun(job_name="refresh_prompt_version", run_id=make_new_run_id(), remote_job_origin=origin,
                     status=getattr(dg.DagsterRunStatus, status), tags=tags or {}, **fields)
    instance.add_run(run)
    return run


def check_queue_and_retry_decisions(instance) -> None:
    """Runs queued in `instance`, picked by the run-queue daemon's own selection; failed runs judged by the
    retry policy the daemon applies. 10 runs are added."""
    from dagster._core.events import RunFailureReason
    from dagster._core.execution.retries import auto_reexecution_should_retry_run
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    sensor = {"distill/trigger": "prompt-version-sensor"}
    queued = {name: _add_run(instance, "QUEUED", tags) for name, tags in [
        ("sensor1", sensor), ("sensor2", sensor), ("sensor3", sensor), ("nightly", {"distill/trigger": "nightly"}),
        ("backfill1", {"dagster/backfill": "bf-a"}), ("backfill2", {"dagster/backfill": "bf-b"}),
        ("backfill3", {"dagster/backfill": "bf-a"}),
    ]}
    by_id = {run.run_id: name for name, run in queued.items()}
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)

    def picked() -> list[str]:
        runs = daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), fixed_iteration_time=None)
        return [by_id[r.run_id] for r in runs]

    assert picked() == ["sensor1", "sensor2", "nightly", "backfill1"]  # sensor3 waits; 4 runs at most
    _report(instance, queued["sensor1"], "RUN_START")
    _report(instance, queued["sensor2"], "RUN_START")
    assert picked() == ["nightly", "backfill1"]  # two sensor runs in progress: the third waits, the rest go
    for name in ("sensor1", "sensor2"):
        _report(instance, queued[name], "RUN_SUCCESS")
    _report(instance, queued["nightly"], "RUN_START")
    assert picked() == ["sensor3", "backfill1", "backfill2"]  # two backfill runs at once, whichever backfill

    root = _add_run(instance, "FAILURE")
    assert auto_reexecution_should_retry_run(instance, root, RunFailureReason.UNEXPECTED_TERMINATION)
    assert auto_reexecution_should_retry_run(instance, root, RunFailureReason.RUN_WORKER_RESTART)
    # a failed asset or a failed blocking check fails a step: never retried (it would retrain on the same rows)
    assert not auto_reexecution_should_retry_run(instance, root, RunFailureReason.STEP_FAILURE)
    retry1 = _retry_of(instance, root, root)
    assert auto_reexecution_should_retry_run(instance, retry1, RunFailureReason.UNEXPECTED_TERMINATION)
    retry2 = _retry_of(instance, root, retry1)
    assert not auto_reexecution_should_retry_run(instance, retry2, RunFailureReason.UNEXPECTED_TERMINATION)


def _retry_of(instance, root, parent):
    """A failed re-execution of `parent`, as Dagster records one (the run group is kept in these tags)."""
    return _add_run(instance, "FAILURE", {"dagster/root_run_id": root.run_id, "dagster/parent_run_id": parent.run_id},
                    root_run_id=root.run_id, parent_run_id=parent.run_id)


def _report(instance, run, event_type: str) -> None:
    """A run event as the run worker reports it (the instance updates the run's status from it)."""
    from dagster._core.events import DagsterEvent, DagsterEventType

    event = DagsterEvent(event_type_value=getattr(DagsterEventType, event_type).value, job_name=run.job_name)
    instance.report_dagster_event(event, run_id=run.run_id)


def test_local_instance_is_sqlite_under_dagster_home_with_queue_and_retry_limits(tmp_path, monkeypatch):
    import dagster as dg
    from dagster._core.storage.runs import SqliteRunStorage

    config = instance_config(LOCAL_INSTANCE)
    assert "storage" not in config and "run_coordinator" not in config  # SQLite and the default queue
    assert config["concurrency"]["runs"]["tag_concurrency_limits"] == EXPECTED_TAG_LIMITS
    assert (REPO / "dagster.yaml").resolve() == LOCAL_INSTANCE.resolve()

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(LOCAL_INSTANCE, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, SqliteRunStorage)
        check_queue_and_retry_settings(instance)
        check_queue_and_retry_decisions(instance)
        assert instance.get_runs_count() == 10
    assert (home / "history" / "runs.db").is_file()  # the runs went to SQLite under DAGSTER_HOME
    with dg.DagsterInstance.get() as again:
        assert again.get_runs_count() == 10


def test_production_instance_on_postgres(db_url, tmp_path, monkeypatch):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    config = instance_config(PROD_INSTANCE)
    assert config["concurrency"] == instance_config(LOCAL_INSTANCE)["concurrency"]
    for section in ("run_retries", "run_monitoring", "telemetry"):
        assert config[section] == instance_config(LOCAL_INSTANCE)[section]

    pg = PgServer.from_url(db_url)
    env = {"DAGSTER_PG_HOST": pg.host, "DAGSTER_PG_PORT": str(pg.port), "DAGSTER_PG_DB": urlsplit(db_url).path[1:],
           "DAGSTER_PG_USER": pg.user, "DAGSTER_PG_PASSWORD": pg.password,
           "DAGSTER_STORAGE_DIR": str(tmp_path / "storage"), "DAGSTER_COMPUTE_LOGS_DIR": str(tmp_path / "logs")}
    assert env_names(yaml.safe_load(PROD_INSTANCE.read_text())) == set(env)
    for name, value in {**env, **({"PGHOST": pg.socket_dir} if pg.socket_dir else {})}.items():
        monkeypatch.setenv(name, value)

    with dg.DagsterInstance.from_config(str(DOCKER)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.storage_directory() == str(tmp_path / "storage" / "storage")
        assert Path(instance.compute_log_manager._base_dir) == tmp_path / "logs"
        check_queue_and_retry_settings(instance)
        check_queue_and_retry_decisions(instance)
        run = _add_run(instance, "QUEUED", {"distill/trigger": "nightly"})
    with dg.DagsterInstance.from_config(str(DOCKER)) as again:  # a new connection reads it back
        record = again.get_run_by_id(run.run_id)
        assert record is not None and record.tags["distill/trigger"] == "nightly"
    with psycopg.connect(db_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT run_id FROM runs")}
    assert run.run_id in stored and len(stored) == 11


@pytest.mark.parametrize("path", [LOCAL_INSTANCE, PROD_INSTANCE], ids=["local", "production"])
@pytest.mark.parametrize("mistake", [
    ("run_retries", "max_retries", "max_retry"),
    ("concurrency", "runs", "run"),
    ("run_monitoring", "enabled", "enable"),
])
def test_mistyped_instance_key_is_rejected(path, mistake, tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError

    section, key, typo = mistake
    doc = yaml.safe_load(path.read_text())
    doc[section][typo] = doc[section].pop(key)
    broken = tmp_path / "dagster.yaml"
    broken.write_text(yaml.safe_dump(doc))
    with pytest.raises(DagsterInvalidConfigError, match=typo):
        instance_config(broken)


def test_mistyped_postgres_setting_is_rejected(tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError

    doc = yaml.safe_load(PROD_INSTANCE.read_text())
    doc["storage"]["postgres"]["postgres_db"]["host"] = doc["storage"]["postgres"]["postgres_db"].pop("hostname")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(DagsterInvalidConfigError, match="host"):
        instance_config(tmp_path / "dagster.yaml")


# ---------------------------------------------------------------- workspaces

def test_workspaces_load_as_intended():
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    (local,) = location_origins_from_yaml_paths([str(REPO / "workspace.yaml")])
    assert local.location_name == "distill_pipeline"
    assert local.loadable_target_origin.module_name == "distill_pipeline.definitions"

    (remote,) = location_origins_from_yaml_paths([str(DOCKER / "workspace.yaml")])
    assert isinstance(remote, GrpcServerCodeLocationOrigin)
    compose = load_compose()
    code_cmd = effective_command(compose, CODE_SERVICE)
    assert remote.host == CODE_SERVICE and remote.host in compose["services"]
    assert remote.port == int(option(code_cmd, "-p", "--port"))
    assert remote.location_name == option(code_cmd, "--location-name") == local.location_name


# ---------------------------------------------------------------- Dockerfiles

@dataclass
class Image:
    path: Path
    base: str
    cmd: list[str]
    workdir: str
    env: dict[str, str]
    expose: set[int]
    copies: list[tuple[str, str]]  # (source in the build context, absolute destination)
    pip_requirements: set[str]  # names given to `pip install` (canonical); "." = the project
    problems: list[str] = field(default_factory=list)


def dockerignore_patterns(dockerfile_path: Path) -> list[str]:
    ignore = dockerfile_path.with_name(dockerfile_path.name + ".dockerignore")
    if not ignore.exists():
        return []
    return [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            verdict = not negate
    return verdict


def _pip_names(run_line: str) -> set[str]:
    names = set()
    for segment in re.split(r"&&|;", run_line):
        words = shlex.split(segment)
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for word in words[2:]:
            if skip_next or word.startswith("$"):
                skip_next = False
                continue
            if word in ("--index-url", "-i", "--extra-index-url", "-f", "--find-links"):
                skip_next = True
            elif word == ".":
                names.add(".")
            elif not word.startswith("-"):
                names.add(canonicalize_name(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", word).group(0)))
    return names


def read_image(path: Path, context: Path = REPO) -> Image:
    """Parse a Dockerfile with BuildKit's parser; collect what the compose and the native run rely on."""
    commands = dockerfile.parse_file(str(path))
    patterns = dockerignore_patterns(path)
    args, env, expose, copies, pips = {}, {}, set(), [], set()
    base, cmd, workdir, problems = "", [], "/", []
    for c in commands:
        if c.cmd == "ARG":
            for value in c.value:
                name, _, default = value.partition("=")
                args[name] = default
        elif c.cmd == "FROM":
            base = c.value[0] if c.value else ""
        elif c.cmd == "ENV":
            for name, value in zip(c.value[::2], c.value[1::2]):
                env[name] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value)
        elif c.cmd == "WORKDIR":
            workdir = str(PurePosixPath(workdir, c.value[0]))
        elif c.cmd == "EXPOSE":
            expose |= {int(v.split("/")[0]) for v in c.value}
        elif c.cmd == "CMD":
            cmd = list(c.value) if c.json else ["sh", "-c", c.value[0]]
        elif c.cmd == "RUN":
            pips |= _pip_names(" ".join(c.value))
        elif c.cmd in ("COPY", "ADD"):
            if any(f.startswith("--from") for f in c.flags):
                continue
            *sources, dest = c.value
            dest_abs = str(PurePosixPath(workdir, dest))
            for src in sources:
                target = dest_abs if len(sources) == 1 and not dest.endswith("/") else str(
                    PurePosixPath(dest_abs, PurePosixPath(src).name))
                copies.append((src, target))
                problems += _copy_problems(src, context, patterns, c.start_line)
    if not base:
        problems.append("no FROM")
    if not cmd:
        problems.append("no CMD")
    return Image(path, base, cmd, workdir, env, expose, copies, pips, problems)


def _copy_problems(src: str, context: Path, patterns: list[str], line: int) -> list[str]:
    source = context / src
    if not source.exists():
        return [f"line {line}: COPY source {src} is not in the build context"]
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    sent = [f for f in files if not ignored(f.relative_to(context).as_posix(), patterns)]
    if not sent:
        return [f"line {line}: COPY source {src} is excluded by the .dockerignore"]
    return []


def installed_closure(image: Image) -> set[str]:
    """The distributions an image installs: what `pip install` names (the project's dependencies for "."),
    with their dependencies as this environment's metadata gives them."""
    todo = {n for n in image.pip_requirements if n != "."}
    if "." in image.pip_requirements:
        todo.add("distill-pipeline")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.add(canonicalize_name(req.name))
    return seen


def provides_executable(image: Image, exe: str) -> bool:
    if exe in ("python", "python3"):
        return image.base.startswith("python:")
    owners = {canonicalize_name(ep.dist.name) for ep in md.entry_points(group="console_scripts", name=exe)}
    return bool(owners & installed_closure(image))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_parses_and_copies_only_what_exists(name):
    image = read_image(DOCKER / name)
    assert image.problems == []
    assert image.base.startswith("python:3.11-slim")


def test_training_image_runs_the_pod_entry_point():
    from distill_pipeline.clients.compute import POD_MODULE

    image = read_image(DOCKER / "Dockerfile")
    assert image.cmd[:3] == ["python", "-m", POD_MODULE]
    assert ("distill_pipeline", "/app/distill_pipeline") in image.copies and "." in image.pip_requirements
    # the image's command, here: the module parses its arguments and exits 0
    done = subprocess.run([sys.executable, *image.cmd[1:]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--prompt-version" in done.stdout
    # and the CPU image serves the code location from the same project
    dagster_image = read_image(DOCKER / "Dockerfile.dagster")
    assert ("distill_pipeline", "/app/distill_pipeline") in dagster_image.copies
    assert "distill_pipeline.definitions" in dagster_image.cmd


def test_image_pins_match_this_environment():
    from packaging.specifiers import SpecifierSet

    mlflow_pins = [line for line in (DOCKER / "Dockerfile.mlflow").read_text().split('"') if line.startswith("mlflow==")]
    assert mlflow_pins == [f"mlflow=={md.version('mlflow')}"]  # the server tested below is the image's
    text = (DOCKER / "Dockerfile.dagster").read_text()
    spec = re.search(r'"dagster-postgres([^"]+)"', text).group(1)
    assert md.version("dagster-postgres") in SpecifierSet(spec)
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"dagster-postgres{spec}" in dev
    assert re.search(r"ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu\n", text)


def test_broken_dockerfiles_are_rejected(tmp_path):
    good = (DOCKER / "Dockerfile.dagster").read_text()
    cases = {
        "missing source": good.replace("COPY docker/workspace.yaml", "COPY docker/workspace.yml"),
        "excluded source": good.replace("COPY docker/workspace.yaml", "COPY docker/env.example"),
        "no command": re.sub(r"\nCMD .*\n", "\n", good),
    }
    for what, text in cases.items():
        broken = tmp_path / "Dockerfile.dagster"
        broken.write_text(text)
        shutil.copy(DOCKER / "Dockerfile.dagster.dockerignore", tmp_path / "Dockerfile.dagster.dockerignore")
        assert read_image(broken).problems, what
    broken.write_text("FROM python:3.11-slim\nCOPY <<EOF\n")  # an unterminated heredoc
    with pytest.raises(dockerfile.GoParseError):
        read_image(broken)


# ---------------------------------------------------------------- the compose file

_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|(\w+))")


class MissingVariable(Exception):
    pass


def interpolate(value, variables: dict[str, str]):
    """Compose's variable interpolation: $$, ${V}, $V, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, ${V:+a}, ${V+a}."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        present = name in variables
        filled = present and variables[name] != ""
        if op in (":-", "-"):
            return variables[name] if (filled if op == ":-" else present) else interpolate(arg, variables)
        if op in (":?", "?"):
            if not (filled if op == ":?" else present):
                raise MissingVariable(f"{name}: {arg}")
            return variables[name]
        if op in (":+", "+"):
            return interpolate(arg, variables) if (filled if op == ":+" else present) else ""
        return variables.get(name, "")

    return _VAR.sub(one, value)


def compose_variables(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(set(), *(compose_variables(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(set(), *(compose_variables(v) for v in value))
    if isinstance(value, str):
        return {m.group(2) or m.group(5) for m in _VAR.finditer(value) if not m.group(1)}
    return set()


def env_example() -> tuple[dict[str, str], set[str]]:
    """(the variables env.example sets, the names it mentions at all, commented ones too)."""
    values, names = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            names.add(m.group(1))
            if not line.startswith("#"):
                values[m.group(1)] = m.group(2)
    return values, names


def load_compose(path: Path = COMPOSE, variables: dict[str, str] | None = None) -> dict:
    raw = yaml.safe_load(path.read_text())  # resolves the anchors and << merges, as Compose does
    return interpolate(raw, env_example()[0] if variables is None else variables)


def compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def service_image(compose: dict, name: str) -> Image | None:
    build = compose["services"][name].get("build")
    if build is None:
        return None
    return read_image((COMPOSE.parent / build["context"] / build["dockerfile"]).resolve())


def effective_command(compose: dict, name: str) -> list[str]:
    command = compose["services"][name].get("command")
    if command is None:
        image = service_image(compose, name)
        return list(image.cmd) if image else []
    return shlex.split(command) if isinstance(command, str) else list(command)


def healthcheck_argv(compose: dict, name: str) -> list[str]:
    test = compose["services"][name]["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return list(test[1:])


def option(argv: list[str], *names: str) -> str | None:
    for i, word in enumerate(argv[:-1]):
        if word in names:
            return argv[i + 1]
    return None


def _ports_named(argv: list[str]) -> set[int]:
    """Container ports a command or healthcheck names: -p/--port N, localhost:N / 127.0.0.1:N / 0.0.0.0:N."""
    ports = {int(argv[i + 1]) for i, w in enumerate(argv[:-1]) if w in ("-p", "--port") and argv[i + 1].isdigit()}
    for word in argv:
        ports |= {int(p) for p in re.findall(r"(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d+)", word)}
    return ports


def compose_problems(compose: dict) -> list[str]:
    """What the schema cannot see: the services against their images, each other and the instance file."""
    problems = []
    services = compose["services"]
    prod_env = env_names(yaml.safe_load(PROD_INSTANCE.read_text()))
    for name, svc in services.items():
        image = service_image(compose, name)
        if "healthcheck" not in svc:
            problems.append(f"{name}: no healthcheck")
            continue
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        if image is None:
            continue
        problems += [f"{name}: {p}" for p in image.problems]
        command, health = effective_command(compose, name), healthcheck_argv(compose, name)
        for exe in {command[0], health[0]} - {"sh"}:
            if not provides_executable(image, exe):
                problems.append(f"{name}: {exe} is not installed by {image.path.name}")
        serves = _ports_named(command)
        published = {int(str(p).split(":")[-1]) for p in svc.get("ports", [])}
        for port in serves | published:
            if port not in image.expose:
                problems.append(f"{name}: port {port} is not exposed by {image.path.name}")
        if published - serves:
            problems.append(f"{name}: publishes {sorted(published - serves)} but serves {sorted(serves)}")
        if _ports_named(health) and not _ports_named(health) <= serves:
            problems.append(f"{name}: healthcheck asks port {sorted(_ports_named(health))}, serves {sorted(serves)}")
        if name in DAGSTER_SERVICES:
            env = {**image.env, **svc.get("environment", {})}
            copied = dict((dest, src) for src, dest in image.copies)
            if copied.get(str(PurePosixPath(env.get("DAGSTER_HOME", "/"), "dagster.yaml"))) != "docker/dagster.yaml":
                problems.append(f"{name}: DAGSTER_HOME does not hold docker/dagster.yaml")
            if prod_env - set(env):
                problems.append(f"{name}: docker/dagster.yaml reads unset {sorted(prod_env - set(env))}")
        if name in (WEB_SERVICE, DAEMON_SERVICE):
            if copied.get(option(command, "-w", "--workspace") or "") != "docker/workspace.yaml":
                problems.append(f"{name}: does not load docker/workspace.yaml")
            code_flags = {"-m", "--module-name", "-f", "--python-file", "--package-name", "-d", "--working-directory"}
            if code_flags & set(command):
                problems.append(f"{name}: loads the code directly")
    return problems


def test_compose_matches_the_compose_specification():
    raw = yaml.safe_load(COMPOSE.read_text())
    assert schema_errors(raw) == []
    assert schema_errors(load_compose()) == []
    assert set(raw["services"]) == {"postgres", "mlflow", CODE_SERVICE, WEB_SERVICE, DAEMON_SERVICE}


def test_compose_agrees_with_images_instance_and_env_example():
    compose = load_compose()
    assert compose_problems(compose) == []
    # every variable the compose reads is in env.example (set, or commented with its default)
    values, mentioned = env_example()
    assert compose_variables(yaml.safe_load(COMPOSE.read_text())) <= mentioned
    # the passwords are required: without them the compose refuses to start
    for required in ("POSTGRES_PASSWORD", "DAGSTER_PG_PASSWORD", "MLFLOW_PG_PASSWORD"):
        with pytest.raises(MissingVariable, match=required):
            load_compose(variables={k: v for k, v in values.items() if k != required})
    # the header's one command names the files that exist
    header = COMPOSE.read_text().split("\nname:")[0]
    assert "docker compose -f docker/docker-compose.yml --env-file docker/.env up --build" in header
    assert "cp docker/env.example docker/.env" in header


def test_broken_compose_files_are_rejected():
    good = yaml.safe_load(COMPOSE.read_text())
    typo = copy.deepcopy(good)
    typo["services"]["mlflow"]["healthcheck"]["tset"] = typo["services"]["mlflow"]["healthcheck"].pop("test")
    assert any("tset" in e for e in schema_errors(typo))
    bad_depends = copy.deepcopy(good)
    bad_depends["services"][WEB_SERVICE]["depends_on"]["dagster-code"]["condition"] = "when_ready"
    assert schema_errors(bad_depends)

    values = env_example()[0]
    wrong_port = interpolate(copy.deepcopy(good), values)
    wrong_port["services"][CODE_SERVICE]["healthcheck"]["test"][-1] = "4001"
    no_health = interpolate(copy.deepcopy(good), values)
    del no_health["services"][DAEMON_SERVICE]["healthcheck"]
    direct_code = interpolate(copy.deepcopy(good), values)
    direct_code["services"][WEB_SERVICE]["command"] += ["-m", "distill_pipeline.definitions"]
    unset_env = interpolate(copy.deepcopy(good), values)
    del unset_env["services"][DAEMON_SERVICE]["environment"]["DAGSTER_PG_USER"]
    for broken, expected in [(wrong_port, "healthcheck asks port"), (no_health, "no healthcheck"),
                             (direct_code, "loads the code directly"), (unset_env, "reads unset")]:
        assert schema_errors(broken) == []  # valid Compose, wrong deployment: only the cross-checks see it
        assert any(expected in p for p in compose_problems(broken)), expected


# ---------------------------------------------------------------- the services, run here

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Native:
    """One compose service as a local process: its command, healthcheck and environment translated."""

    name: str
    argv: list[str] | None  # None: the postgres service, played by the test's server
    health: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    proc: subprocess.Popen | None = None
    check: subprocess.Popen | None = None
    started_at: float = 0.0
    healthy: bool = False


class Localizer:
    """Service names -> this machine, container ports -> free ports, container paths -> `root`."""

    def __init__(self, compose: dict, root: Path, pg: PgServer):
        self.compose, self.root = compose, root
        self.hosts = {name: "127.0.0.1" for name in compose["services"]}
        self.hosts["postgres"] = pg.host
        self.ports: dict[str, dict[int, int]] = {"postgres": {5432: pg.port}}
        for name in compose["services"]:
            if name == "postgres":
                continue
            image = service_image(compose, name)
            wanted = (image.expose if image else set()) | _ports_named(effective_command(compose, name))
            self.ports[name] = {p: free_port() for p in wanted}

    def text(self, service: str, value: str) -> str:
        own = self.ports.get(service, {})
        value = re.sub(r"(?<![\w.-])(localhost|127\.0\.0\.1|0\.0\.0\.0):(\d+)",
                       lambda m: f"{m.group(1)}:{own.get(int(m.group(2)), m.group(2))}", value)
        for other, host in self.hosts.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(other)}:(\d+)(?!\w)",
                           lambda m: f"{host}:{self.ports[other][int(m.group(1))]}", value)
        if value.startswith("/") and (self.root / value.lstrip("/").split("/")[0]).exists():
            value = str(self.root) + value
        return value

    def argv(self, service: str, argv: list[str]) -> list[str]:
        out = []
        for i, word in enumerate(argv):
            prev = argv[i - 1] if i else ""
            if prev in ("-h", "--host") and word == "0.0.0.0":
                out.append("127.0.0.1")  # nothing here listens beyond this machine
            elif prev in ("-p", "--port") and word.isdigit():
                out.append(str(self.ports[service][int(word)]))
            else:
                out.append(self.text(service, word))
        return out

    def env(self, service: str, env: dict[str, str]) -> dict[str, str]:
        out = {k: self.text(service, str(v)) for k, v in env.items()}
        for key, value in env.items():
            if value in self.hosts:  # e.g. DAGSTER_PG_HOST: postgres (and its DAGSTER_PG_PORT)
                out[key] = self.hosts[value]
                port_key = key[: -len("HOST")] + "PORT" if key.endswith("HOST") else None
                if port_key in env:
                    out[port_key] = str(self.ports[value][int(env[port_key])])
        return out

    def lay_out_files(self, volumes_dir: Path) -> None:
        """What the containers see: each image's COPY destinations and each service's volumes, under root."""
        for name, svc in self.compose["services"].items():
            image = service_image(self.compose, name)
            for src, dest in image.copies if image else []:
                target = self.root / dest.lstrip("/")
                if target.exists() or target.is_symlink():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if src == "docker/workspace.yaml":  # it names the code server by its service name and port
                    doc = yaml.safe_load((REPO / src).read_text())
                    for entry in doc["load_from"]:
                        grpc = entry["grpc_server"]
                        grpc["port"] = self.ports[grpc["host"]][grpc["port"]]
                        grpc["host"] = self.hosts[grpc["host"]]
                    target.write_text(yaml.safe_dump(doc))
                else:
                    target.symlink_to(REPO / src)
            for volume in svc.get("volumes", []):
                source, dest = volume.split(":")[:2]
                target = self.root / dest.lstrip("/")
                if target.exists() or target.is_symlink():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.startswith((".", "/")):
                    target.symlink_to((COMPOSE.parent / source).resolve())
                else:
                    (volumes_dir / source).mkdir(parents=True, exist_ok=True)
                    target.symlink_to(volumes_dir / source)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL", "DAGSTER", "MLFLOW", "PG"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _start_group(argv, env, cwd, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop_groups(procs: list[subprocess.Popen | None]) -> None:
    """SIGTERM to the process groups this test started, all at once; SIGKILL to what is left after 15 s."""
    procs = [p for p in procs if p is not None]
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for proc in procs:
                proc.poll()  # reap the leaders, so that only live members keep a group
            if not any(_group_alive(p.pid) for p in procs):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


WORKSPACE_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on RepositoryLocation { repositories { jobs { name } sensors { name } } }
                        ... on PythonError { message } } } } } }"""


@pytest.mark.timeout(300)
def test_compose_services_run_natively(pg_server_url, tmp_path):
    """postgres (the test's server, prepared by postgres-init.sh), mlflow, dagster-code, dagster-webserver and
    dagster-daemon, each started when what it depends_on is healthy, until every healthcheck exits 0."""
    tag = "t_" + uuid.uuid4().hex[:10]
    variables = {**env_example()[0],
                 "POSTGRES_PASSWORD": "pw" + uuid.uuid4().hex, "DAGSTER_PG_PASSWORD": "pw" + uuid.uuid4().hex,
                 "MLFLOW_PG_PASSWORD": "pw" + uuid.uuid4().hex, "DATABASE_URL": "",
                 "DAGSTER_PG_DB": f"{tag}_dagster", "DAGSTER_PG_USER": f"{tag}_dagster",
                 "MLFLOW_PG_DB": f"{tag}_mlflow", "MLFLOW_PG_USER": f"{tag}_mlflow"}
    compose = load_compose(variables=variables)
    pg = PgServer.from_url(pg_server_url)
    root = tmp_path / "fs"
    root.mkdir()
    loc = Localizer(compose, root, pg)
    loc.lay_out_files(tmp_path / "volumes")

    natives: dict[str, Native] = {}
    pg_tools = f"{Path(pg_bin('psql')).parent}"
    for name, svc in compose["services"].items():
        image = service_image(compose, name)
        env = {**_base_env(), **(image.env if image else {}), **loc.env(name, svc.get("environment", {}))}
        if pg.socket_dir:
            env["PGHOST"] = pg.socket_dir  # libpq's socket folder where a URL or setting leaves the host empty
        argv = loc.argv(name, effective_command(compose, name)) if image else None
        if name == CODE_SERVICE:
            # The one change to the compose's environment: no prompt files, so the prompt-version sensor
            # evaluates (and records a skipped tick) instead of starting teacher and training runs here.
            (tmp_path / "no_prompts").mkdir()
            env["DISTILL__PROMPTS_DIR"] = str(tmp_path / "no_prompts")
        if name == "postgres":  # the postgres image's own user and local connection
            env.update(pg.libpq_env(), POSTGRES_USER=pg.user, PATH=f"{env['PATH']}{os.pathsep}{pg_tools}")
        cwd = root / (image.workdir.lstrip("/") if image else "")
        cwd.mkdir(parents=True, exist_ok=True)
        natives[name] = Native(name, argv, loc.argv(name, healthcheck_argv(compose, name)), env, cwd,
                               tmp_path / f"{name}.log")
    assert all(natives[n].argv for n in natives if n != "postgres")

    def depends_ready(name: str) -> bool:
        return all(natives[d].healthy if c.get("condition") == "service_healthy" else natives[d].proc or
                   natives[d].healthy for d, c in (compose["services"][name].get("depends_on") or {}).items())

    created = False
    try:
        pg_native = natives["postgres"]
        init_scripts = sorted((root / "docker-entrypoint-initdb.d").iterdir())
        assert [p.name for p in init_scripts] == ["10-init.sh"]
        for script in init_scripts:  # what the postgres image runs on its first start
            created = True
            done = subprocess.run(["sh", str(script)], env=pg_native.env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        pg_native.started_at = time.monotonic()

        deadline_per_service = 90
        while not all(n.healthy for n in natives.values()):
            now = time.monotonic()
            for n in natives.values():
                if n.healthy:
                    continue
                if n.argv is not None and n.proc is None:
                    if depends_ready(n.name):
                        n.proc, n.started_at = _start_group(n.argv, n.env, n.cwd, n.log), now
                    continue
                if n.proc is not None and n.proc.poll() is not None:
                    pytest.fail(f"{n.name} exited with {n.proc.returncode}:\n{_tail(n.log)}")
                if n.check is not None and n.check.poll() is not None:
                    n.healthy, n.check = n.check.returncode == 0, None
                    continue
                if n.check is None:
                    n.check = _start_group(n.health, n.env, n.cwd, n.log.with_suffix(".health.log"))
                if now - n.started_at > deadline_per_service:
                    pytest.fail(f"{n.name} not healthy after {deadline_per_service} s:\n{_tail(n.log)}\n"
                                f"healthcheck: {_tail(n.log.with_suffix('.health.log'), 10)}")
            time.sleep(1.0)

        # the webserver sees the code location over gRPC (docker/workspace.yaml), loaded, with the pipeline's jobs
        web_port = loc.ports[WEB_SERVICE][3000]
        for _ in range(60):
            (entry,) = _graphql(web_port, WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
            if entry["loadStatus"] == "LOADED":
                break
            time.sleep(1)
        assert entry["name"] == "distill_pipeline", entry
        (repo,) = entry["locationOrLoadError"]["repositories"]
        assert {"nightly_export", "refresh_prompt_version"} <= {j["name"] for j in repo["jobs"]}
        assert "prompt_versions_sensor" in {s["name"] for s in repo["sensors"]}

        # the daemon heartbeats into the compose's dagster database, including the run queue and the run retries (EVENT_LOG_CONSUMER)
        with psycopg.connect(dbname=variables["DAGSTER_PG_DB"], user=variables["DAGSTER_PG_USER"],
                             **_pg_kwargs(pg)) as conn:
            daemons = {r[0] for r in conn.execute("SELECT daemon_type FROM daemon_heartbeats")}
        assert {"SENSOR", "SCHEDULER", "QUEUED_RUN_COORDINATOR", "MONITORING", "EVENT_LOG_CONSUMER"} <= daemons
        # and its sensor daemon evaluated the pipeline's sensor in the code server, recording the tick there
        for _ in range(45):
            with psycopg.connect(dbname=variables["DAGSTER_PG_DB"], user=variables["DAGSTER_PG_USER"],
                                 **_pg_kwargs(pg)) as conn:
                ticks = [(status, body) for status, body in conn.execute("SELECT status, tick_body FROM job_ticks")
                         if "prompt_versions_sensor" in body]
            if ticks and all(status != "STARTED" for status, _ in ticks):
                break
            time.sleep(1)
        assert ticks, "no tick of prompt_versions_sensor in the dagster database"
        status, body = ticks[0]
        assert status == "SKIPPED" and "no new prompt version" in body, (status, body[:500])

        # MLflow keeps runs in its Postgres database and artifacts on its volume, through the server
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{loc.ports['mlflow'][5000]}")
        experiment = client.create_experiment("deployment-check")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "ok", "check.txt")
        assert list((tmp_path / "volumes" / "mlartifacts").rglob("check.txt"))
        with psycopg.connect(dbname=variables["MLFLOW_PG_DB"], user=variables["MLFLOW_PG_USER"],
                             **_pg_kwargs(pg)) as conn:
            assert conn.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone() == (1,)
    finally:
        _stop_groups([p for n in natives.values() for p in (n.check, n.proc)])
        if created:
            with psycopg.connect(pg_server_url, autocommit=True) as conn:
                for kind in ("dagster", "mlflow"):
                    conn.execute(f'DROP DATABASE IF EXISTS "{tag}_{kind}" WITH (FORCE)')
                    conn.execute(f'DROP ROLE IF EXISTS "{tag}_{kind}"')


def _pg_kwargs(pg: PgServer) -> dict:
    return {"host": pg.socket_dir or pg.host, "port": pg.port, **({"password": pg.password} if pg.password else {})}
