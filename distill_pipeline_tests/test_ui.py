"""The Dagster UI as a person meets it: `dagster dev` on loopback, its GraphQL API, and headless Chromium.

One `dagster dev` (webserver, daemon, code server) serves the repository's workspace.yaml for this module, with
its own DAGSTER_HOME (the pipeline's instance settings, as `make dev` copies them), DISTILL_HOME and DISTILL_CONFIG:
the demo config pointed at a fresh test database holding a small seeded demo table, its prompt versions
registered as partitions the way `distill` registers them.

- GraphQL: source_rows, then teacher_labels for the first prompt version, launched as the UI's Materialize button
  launches them (the implicit asset job, an asset selection, the partition tag), followed until they succeed.
- Browser: Debian's chromium through its chromedriver (`make browser` installs both) opens the global asset
  lineage, expands its groups and finds every asset of the definitions with its number of checks, then each
  asset's Checks tab with the checks' names. The graph's screenshot goes to the test's folder and, when
  UI_SCREENSHOT_DIR is set, there too: `UI_SCREENSHOT_DIR=docs pytest distill_pipeline_tests/test_ui.py` makes
  docs/asset-graph.png. (conftest.py clears DISTILL_* variables, hence the name.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from distill_pipeline.cli import INSTANCE_SETTINGS, register_prompt_versions
from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import PipelineConfig, load_config
from distill_pipeline.demo.seed import demo_prompt_keys, seed_demo_table
from distill_pipeline_tests.conftest import REPO, with_database
from distill_pipeline_tests.test_teacher_labels import write_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NO_BROWSER = f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian's chromium and chromium-driver): run `make browser`"
ROWS, SEED = 200, 3
# Wide enough that the fitted graph is drawn at a scale showing each asset's facets (its checks among them).
VIEWPORT = (2000, 1000)
RUN_TIMEOUT_S = 240
LOCATION = "distill_pipeline"  # workspace.yaml's location_name
REPOSITORY = "__repository__"  # the one repository of a Definitions object
ASSET_JOB = "__ASSET_JOB"  # the implicit job the UI materializes assets with
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass
class DevServer:
    port: int
    config: Path
    cfg: PipelineConfig
    dagster_home: Path
    partitions: tuple[str, ...]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url + "/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
        assert not answer.get("errors"), answer["errors"]
        return answer["data"]

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.dagster_home))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sigint_as_in_a_terminal() -> None:
    # dagster dev maps SIGTERM to SIGINT's handler; a shell running pytest in the background leaves SIGINT ignored,
    # which the server would inherit and then ignore both: give it the default back, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Ctrl+C to the server's process group, as in a terminal; whatever is left after grace_s (or after the
    leader has gone: code servers, run workers) is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


WORKSPACE_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def wait_until_loaded(server: DevServer, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    """/server_info answers and the code location has loaded (its definitions, or the error that stopped them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"dagster dev exited with {proc.returncode}:\n{server.log_tail()}"
        assert time.monotonic() < deadline, f"dagster dev not ready after {timeout_s:.0f} s:\n{server.log_tail()}"
        try:
            with urllib.request.urlopen(server.url + "/server_info", timeout=10) as reply:
                info = json.loads(reply.read())
            entries = server.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
        except (OSError, ValueError):
            time.sleep(1)
            continue
        entry = next((e for e in entries if e["name"] == LOCATION), None)
        if entry and entry["loadStatus"] == "LOADED":
            loaded = entry["locationOrLoadError"]
            assert loaded["__typename"] == "RepositoryLocation", f"{LOCATION} failed to load: {loaded}"
            assert info["dagster_webserver_version"].startswith("1.13"), info
            return
        time.sleep(1)


@pytest.fixture(scope="module")
def ui_db_url(pg_server_url) -> str:
    """A fresh database for this module's server (db_url is per test; the server outlives one)."""
    name = "t_ui_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def dev_server(ui_db_url, tmp_path_factory) -> DevServer:
    root = tmp_path_factory.mktemp("ui")
    config = write_config(root, ui_db_url, kind="demo", timeout_s=30.0)
    cfg = load_config(config, env={})
    assert seed_demo_table(Database(ui_db_url), cfg.source.table, cfg.prompts_dir, rows=ROWS, seed=SEED) == ROWS
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(INSTANCE_SETTINGS, dagster_home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    register_prompt_versions(cfg, instance)  # before the daemon starts: its prompt_versions_sensor finds none new
    instance.dispose()
    server = DevServer(port=free_port(), config=config, cfg=cfg, dagster_home=dagster_home,
                       partitions=demo_prompt_keys(cfg.prompts_dir), log=root / "dagster-dev.log")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DISTILL", "DAGSTER_", "MLFLOW_")) and k != "DATABASE_URL"}
    env.update(DAGSTER_HOME=str(dagster_home), DISTILL_HOME=str(cfg.home), DISTILL_CONFIG=str(config),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with server.log.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(server.port)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
        try:
            wait_until_loaded(server, proc)
            yield server
        finally:
            stop_process_group(proc)


# --- GraphQL -----------------------------------------------------------------------------------------------

MATERIALIZATIONS_QUERY = """query($path: [String!]!, $partitions: [String!]) {
  assetOrError(assetKey: {path: $path}) { __typename ... on Asset { assetMaterializations(partitions: $partitions) {
    runId partition } } } }"""


def launch(client, assets: list[str], partition: str | None = None) -> str:
    return client.submit_job_execution(ASSET_JOB, repository_location_name=LOCATION, repository_name=REPOSITORY,
                                       asset_selection=assets,
                                       tags={"dagster/partition": partition} if partition else None)


def wait_for_run(client, server: DevServer, run_id: str) -> dg.DagsterRunStatus:
    """The run's status through GraphQL until it has finished (queued, dequeued by the daemon, run)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (status := client.get_run_status(run_id)) not in FINISHED:
        assert time.monotonic() < deadline, f"run {run_id} still {status.value} after {RUN_TIMEOUT_S} s:\n" \
                                            f"{server.log_tail()}"
        time.sleep(1)
    if status != dg.DagsterRunStatus.SUCCESS:
        with server.instance() as instance:
            failures = [e.message for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.is_failure]
        pytest.fail(f"run {run_id} ended {status.value}: {failures}\n{server.log_tail()}")
    return status


def test_a_partition_materializes_through_the_graphql_api(dev_server):
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=dev_server.port, timeout=60)
    first = dev_server.partitions[0]
    export = launch(client, ["source_rows"])
    assert wait_for_run(client, dev_server, export) == dg.DagsterRunStatus.SUCCESS
    labels = launch(client, ["teacher_labels"], first)
    assert wait_for_run(client, dev_server, labels) == dg.DagsterRunStatus.SUCCESS

    with dev_server.instance() as instance:
        assert_labelled(instance, dev_server, export, labels)

    # and the webserver serves what the UI shows for the partition
    seen = dev_server.graphql(MATERIALIZATIONS_QUERY, {"path": ["teacher_labels"], "partitions": [first]})
    assert seen["assetOrError"]["assetMaterializations"] == [{"runId": labels, "partition": first}]


def assert_labelled(instance, dev_server, export: str, labels: str) -> None:
    first, second = dev_server.partitions
    key = dg.AssetKey("teacher_labels")
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[first]),
                                              limit=10).records
    assert [(r.run_id, r.partition_key) for r in records] == [(labels, first)]
    meta = {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
    assert meta["rows"] == ROWS and meta["requested"] > 0  # every row labelled, some by the demo teacher it started
    assert meta["prompt_version"] == first and "demo teacher" in meta["teacher_endpoint"]
    assert (dev_server.cfg.stage_dir("teacher_labels", first) / "labels.parquet").is_file()
    assert not instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[second]),
                                               limit=1).records
    evaluations = [e.dagster_event.asset_check_evaluation_data
                   for e in instance.all_logs(labels, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
    assert [(c.check_name, c.passed) for c in evaluations] == [("answers_mostly_usable", True)]
    # the daemon ran its sensors all along: with every prompt version registered they started nothing of their own
    assert sorted(r.run_id for r in instance.get_runs()) == sorted([export, labels])


# --- the browser ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def chromium(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # the driver named here: Selenium Manager (which would download one) is not run
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        # the page itself this size (the window's would lose the browser's own bars)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


# Each drawn asset node (a foreignObject of the graph's SVG): its text and where it is on the page.
NODES_JS = """return Array.from(document.querySelectorAll('svg foreignObject')).map(f => {
  const box = f.querySelector('div'); const r = f.getBoundingClientRect();
  return {text: box ? box.innerText : '', left: r.left, top: r.top, right: r.right, bottom: r.bottom};
});"""


def drawn_nodes(driver, assets: list[str]) -> dict[str, dict]:
    """{asset: node} for the asset nodes drawn in full (name, then facet rows such as "Asset checks")."""
    found = {}
    for node in driver.execute_script(NODES_JS):
        lines = [line.strip() for line in node["text"].splitlines() if line.strip()]
        if lines and lines[0] in assets and "Asset checks" in lines:
            found[lines[0]] = {**node, "lines": lines}
    return found


def settled(assets: list[str]):
    """A wait condition: every asset drawn in full, at the place it had at the previous poll (the graph zooms to
    fit after each layout); returns the nodes."""
    last = {}

    def condition(driver):
        found = drawn_nodes(driver, assets)
        place = {a: (round(n["left"]), round(n["top"]), round(n["right"])) for a, n in found.items()}
        still = len(found) == len(assets) and place == last.get("place")
        last["place"] = place
        return found if still else None

    return condition


def checks_shown(node: dict) -> int:
    """The number of checks the node's "Asset checks" row counts ("k / n Passed"; "–" when it has none)."""
    lines = node["lines"]
    value = lines[lines.index("Asset checks") + 1]
    match = re.fullmatch(r"(\d+) / (\d+) Passed", value)
    assert match or value in ("–", "-"), f"unexpected asset checks row {value!r} in {lines}"
    return int(match.group(2)) if match else 0


def wait(driver, what: str, condition, timeout_s: float = 90):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        body = driver.execute_script("return document.body ? document.body.innerText : ''")
        pytest.fail(f"{what}: not after {timeout_s:.0f} s at {driver.current_url}; the page shows:\n{body[:3000]}")


def dismiss_welcome_dialog(driver, server: DevServer) -> None:
    """A fresh instance greets the first visitor with a newsletter dialog over the page: Skip, as a person would."""
    from selenium.webdriver.common.by import By

    if not server.graphql("{ shouldShowNux }")["shouldShowNux"]:
        return
    skip = wait(driver, "the welcome dialog's Skip button",
                lambda d: next(iter(d.find_elements(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Skip']")), None),
                timeout_s=30)
    skip.click()
    wait(driver, "the welcome dialog closed", lambda d: not d.find_elements(By.XPATH, "//*[@role='dialog']"), 15)


def open_the_whole_graph(driver, server: DevServer, groups: int) -> None:
    """Global asset lineage, the navigation and the group list folded away, every group expanded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(server.url + "/asset-groups")
    wait(driver, "the global asset lineage", lambda d: "Global asset lineage" in d.find_element(By.TAG_NAME, "body").text
         and d.find_elements(By.CSS_SELECTOR, "svg foreignObject"))
    dismiss_welcome_dialog(driver, server)
    wait(driver, "the Hide navigation button",
         lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='Hide navigation']"))[0].click()
    # the panel listing the groups, left of the graph (its toggle shows a "panel_show_right" icon)
    wait(driver, "the group list's toggle",
         lambda d: d.find_elements(By.CSS_SELECTOR, "button:has([aria-label=panel_show_right])"))[0].click()
    if groups > 1:  # several groups are drawn folded; the graph's settings menu unfolds them
        settings = wait(driver, "the graph's settings button",
                        lambda d: d.find_elements(By.CSS_SELECTOR, "button:has([aria-label=settings])"))
        max(settings, key=lambda b: b.rect["x"]).click()  # the graph's, at the right; not the app's Settings
        wait(driver, "the Expand all groups menu item",
             lambda d: d.find_elements(By.XPATH, "//*[@role='menuitem'][contains(., 'Expand all groups')]"))[0].click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait(driver, "the settings menu closed",
             lambda d: not d.find_elements(By.XPATH, "//*[@role='menuitem'][contains(., 'all groups')]"), 15)


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason=NO_BROWSER)
def test_the_asset_graph_shows_every_asset_and_its_checks_in_chromium(dev_server, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    from distill_pipeline.definitions import build_defs

    graph = build_defs(str(dev_server.config)).resolve_asset_graph()
    assets = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    assert len(assets) == 7, assets  # the pipeline's seven stages
    checks = {a: sorted(c.name for c in graph.asset_check_keys if c.asset_key.to_user_string() == a) for a in assets}
    assert any(checks.values()), checks
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}

    with chromium(tmp_path) as driver:
        open_the_whole_graph(driver, dev_server, len(groups))
        nodes = wait(driver, f"all of {assets} drawn in full, standing still", settled(assets))
        assert {a: checks_shown(n) for a, n in nodes.items()} == {a: len(names) for a, names in checks.items()}
        width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        for asset, node in nodes.items():  # the whole graph is on the page, none of it scrolled or cut off
            assert 0 <= node["left"] < node["right"] <= width and 0 <= node["top"] < node["bottom"] <= height, \
                (asset, node, width, height)
        for group in groups:
            assert driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{group}']"), f"group {group} not shown"

        shot = tmp_path / "asset-graph.png"
        assert driver.save_screenshot(str(shot))
        with Image.open(shot) as img:
            assert img.size == VIEWPORT
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
            assert len(colours) > 50  # text, nodes and edges, not a blank page
        if os.environ.get("UI_SCREENSHOT_DIR"):
            out = Path(os.environ["UI_SCREENSHOT_DIR"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / shot.name)

        for asset, names in checks.items():  # each asset's Checks tab names its checks
            if not names:
                continue
            driver.get(f"{dev_server.url}/assets/{asset}?view=checks")
            wait(driver, f"the checks of {asset}: {names}",
                 lambda d: (text := d.find_element(By.TAG_NAME, "body").text) and f"Checks ({len(names)})" in text
                 and all(n in text for n in names))
