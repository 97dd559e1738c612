"""`distill ...`: the pipeline without the UI.

    distill demo [--rows N]             seed the demo table and materialize the whole graph
    distill materialize [--partition K | --all-versions] [ASSET ...]
                                        materialize assets through Dagster (runs show in the UI)
    distill seed-demo [--rows N]        create/fill the demo table only
    distill prompts                     prompt versions: keys, stored answers reused, inputs to buy and cost
    distill check-config [--ping-teacher]
                                        check config, table, columns, prompts and stored outputs
    distill export | curate K | split K run one data stage directly, without Dagster

Every command reads the config from --config, else $DISTILL_CONFIG, else the demo config.

`demo` and `materialize` print one line per stage with its key figures, progress bars on the long work (on a
terminal, or with DISTILL_PROGRESS=1), and the paths at the end; Dagster's full log and everything else the
run writes go to <home>/logs/distill-<command>-<timestamp>.log (distill_pipeline/console.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from distill_pipeline import console
from distill_pipeline.config import ConfigError, PipelineConfig, load_config

class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2, no traceback."""


INSTANCE_SETTINGS = Path(__file__).parent / "dagster.yaml"
RUN_HOST_TAG, RUN_PID_TAG = "distill/host", "distill/pid"
RUN_JOB = "__ephemeral_asset_job__"  # the job name dg.materialize gives its runs: the UI shows ours the same way
LOGGED_COMMANDS = ("demo", "materialize")  # stage lines on the terminal, the full log in <home>/logs


def dagster_instance(cfg: PipelineConfig):
    """The persistent Dagster instance ($DAGSTER_HOME, default <home>/dagster), shared with `make dev`.

    A home without instance settings gets the pipeline's (run queue, `gpu` pool limit, run monitoring),
    wherever it is; runs this machine's `distill` processes left STARTED when they were killed are marked failed.
    """
    import dagster as dg

    home = Path(os.environ.get("DAGSTER_HOME") or cfg.home / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    if not (home / "dagster.yaml").exists():
        shutil.copy(INSTANCE_SETTINGS, home / "dagster.yaml")
    instance = dg.DagsterInstance.get()
    fail_runs_of_dead_processes(instance)
    return instance


def fail_runs_of_dead_processes(instance) -> list[str]:
    """Mark failed the runs started by a `distill` process of this host that no longer exists."""
    import dagster as dg

    failed = []
    running = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING], tags={RUN_HOST_TAG: socket.gethostname()}))
    for run in running:
        pid = int(run.tags.get(RUN_PID_TAG) or 0)
        if pid and not _process_alive(pid):
            instance.report_run_failed(run, f"the distill process (pid {pid}) running it ended without finishing it "
                                            "(killed?); marked failed by the next distill command")
            failed.append(run.run_id)
    if failed:
        console.say(f"marked {len(failed)} run(s) of killed distill processes as failed: {', '.join(failed)}")
    return failed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register_prompt_versions(cfg: PipelineConfig, instance) -> list[str]:
    from distill_pipeline.defs.partitions import prompt_versions
    from distill_pipeline.stages.prompts import load_prompts

    keys = sorted(load_prompts(cfg.prompts_dir))
    existing = set(instance.get_dynamic_partitions(prompt_versions.name))
    missing = [k for k in keys if k not in existing]
    if missing:
        instance.add_dynamic_partitions(prompt_versions.name, missing)
    return keys


def asset_chain(defs) -> tuple[list[str], list[str]]:
    """(unpartitioned assets, prompt-version assets), each in dependency order, as the definitions have them."""
    graph = defs.resolve_asset_graph()
    plain, partitioned = [], []
    for level in graph.toposorted_asset_keys_by_level:
        for key in sorted(level, key=lambda k: k.to_user_string()):
            (partitioned if graph.get(key).partitions_def is not None else plain).append(key.to_user_string())
    return plain, partitioned


def materialize(defs, select: list[str], partition: str | None, instance, *, gate_may_fail: bool = False) -> None:
    """Materialize `select` in one run; a failed run exits non-zero, unless `gate_may_fail` and what failed is a
    blocking check (the demo shows a student that falls short failing its gate, with the figures).

    In a console session (distill demo / materialize) the run's only logger is the session's: Dagster's log
    goes to the session's log file, one line per stage (and a line per failed step or blocking check) and the
    progress bars to the terminal. Otherwise Dagster's default console logger prints everything, as
    dg.materialize does."""
    import dagster as dg

    plain, partitioned = asset_chain(defs)
    unknown = [name for name in select if name not in plain + partitioned]
    if unknown:
        raise UserError(f"unknown asset(s) {', '.join(unknown)}; the assets are: {', '.join(plain + partitioned)}")
    if partition is None and any(name in partitioned for name in select):
        raise UserError(f"{', '.join(n for n in select if n in partitioned)} are partitioned by prompt version: "
                        "pass --partition KEY (see `distill prompts`)")
    if partition is not None:
        from distill_pipeline.defs.partitions import prompt_versions

        known = sorted(instance.get_dynamic_partitions(prompt_versions.name))
        if partition not in known:
            raise UserError(f"unknown prompt version {partition!r}; the registered ones are: {', '.join(known) or 'none'}")
    session = console.current()
    console.say(f"materializing {', '.join(select)}" + (f" [{partition}]" if partition else ""))
    # dg.materialize, plus the session's logger: the same ephemeral job over the same assets and resources.
    loggers = {"distill": session.dagster_logger()} if session is not None else {}
    run_defs = dg.Definitions(assets=list(defs.assets or []) + list(defs.asset_checks or []),
                              resources=dict(defs.resources or {}), loggers=loggers,
                              jobs=[dg.define_asset_job(RUN_JOB, selection=select)])
    result = run_defs.resolve_job_def(RUN_JOB).execute_in_process(
        run_config={"loggers": {name: {} for name in loggers}} if loggers else None, instance=instance,
        partition_key=partition, tags={RUN_HOST_TAG: socket.gethostname(), RUN_PID_TAG: str(os.getpid())},
        raise_on_error=False)
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed
                     and e.severity == dg.AssetCheckSeverity.ERROR]
    if session is None:  # a session's logger printed them as they came
        for check in failed_checks:
            figures = {k: getattr(v, "value", v) for k, v in (check.metadata or {}).items()}
            print(f"check {check.asset_key.to_user_string()}.{check.check_name} FAILED"
                  + (f" [{partition}]" if partition else "") + f": {json.dumps(figures, default=str)}", flush=True)
    if not result.success and not (gate_may_fail and failed_checks):
        where = f"the full log: {session.log_path}; " if session is not None else ""
        raise SystemExit(f"materialization of {', '.join(select)}" + (f" [{partition}]" if partition else "")
                         + f" failed; {where}the run in the Dagster UI (make dev)")


def cmd_demo(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.definitions import build_defs
    from distill_pipeline.demo.seed import seed_demo_table

    defs = build_defs(args.config)
    plain, partitioned = asset_chain(defs)
    chain = partitioned
    if args.stop_after:
        if args.stop_after not in partitioned:
            raise UserError(f"--stop-after {args.stop_after}: not a prompt-version asset; choose one of "
                            f"{', '.join(partitioned)}")
        chain = partitioned[: partitioned.index(args.stop_after) + 1]
    db = Database.from_config(cfg)
    inserted = seed_demo_table(db, cfg.source.table, cfg.prompts_dir, rows=args.rows, seed=args.seed)
    console.say(f"demo table {cfg.source.table}: {inserted} new rows (Postgres at {db.safe_url})")
    instance = dagster_instance(cfg)
    keys = register_prompt_versions(cfg, instance)
    materialize(defs, plain, None, instance)
    for key in keys:
        materialize(defs, chain, key, instance, gate_may_fail=True)
    console.say("\nOutputs:")
    for stage in plain + partitioned:
        path = cfg.stage_dir(stage)
        if path.exists():
            console.say(f"  {stage:18s} {path.resolve()}")
    console.say(f"  {'dagster runs':18s} {os.environ['DAGSTER_HOME']}   (open them with: make dev)")
    say_outputs()


def say_outputs() -> None:
    """The reports and GGUFs this command built, and its log file."""
    session = console.current()
    if session is None:
        return
    for what, path in session.outputs:
        console.say(f"  {what:18s} {path}")
    console.say(f"  {'full log':18s} {session.log_path}")


def cmd_materialize(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.definitions import build_defs

    defs = build_defs(args.config)
    instance = dagster_instance(cfg)
    keys = register_prompt_versions(cfg, instance)
    plain, partitioned = asset_chain(defs)
    if args.all_versions and args.partition:
        raise UserError("--all-versions and --partition: choose one")
    select = args.assets
    if not select:
        select = partitioned if (args.partition or args.all_versions) else plain
        what = "the export" if select == plain else "the chain of each prompt version"
        console.say(f"no assets named: materializing {what} ({', '.join(select)}); name assets to choose")
    if not args.all_versions:
        materialize(defs, select, args.partition, instance)
        say_outputs()
        return
    if any(name in plain for name in select):
        raise UserError(f"--all-versions runs prompt-version assets; {', '.join(n for n in select if n in plain)} "
                        "is not one (materialize it without --all-versions)")
    for key in keys:
        materialize(defs, select, key, instance)
    say_outputs()


def cmd_seed(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.demo.seed import seed_demo_table

    n = seed_demo_table(Database.from_config(cfg), cfg.source.table, cfg.prompts_dir, rows=args.rows, seed=args.seed)
    print(f"{n} new rows in {cfg.source.table}")


def cmd_prompts(args, cfg: PipelineConfig) -> None:
    """Each prompt version, what it reuses from the table, and what labelling it would buy now."""
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.stages.prompts import load_prompts
    from distill_pipeline.stages.source_rows import read_source_rows
    from distill_pipeline.stages.teacher_labels import plan_labels

    versions = load_prompts(cfg.prompts_dir)
    try:
        rows = read_source_rows(cfg, ["id", "input", "output", "prompt_version"])
    except FileNotFoundError:
        rows = None
    db = Database.from_config(cfg) if rows is not None else None
    for key, version in sorted(versions.items()):
        print(f"{key}\t{version.path}\tfingerprint {version.fingerprint}")
        for name in version.stored_as:
            print(f"    reuses stored answers named {name!r}")
        for name in version.stale_stored_as:
            print(f"    NOT reusing {name!r}: mapped to another fingerprint, so the prompt changed since those answers "
                  f"were made (write {name}: {version.fingerprint} only if they are this prompt's answers)")
        if rows is None:
            continue
        plan = plan_labels(cfg, version, rows, db)
        print(f"    {plan.rows} exported rows: {plan.reused_rows} reuse a stored answer, {plan.invalid_inputs} unusable "
              f"inputs; distinct inputs: {plan.cached_inputs} already in the label cache, {plan.inputs_to_buy} to buy "
              f"(at most ${plan.max_cost_usd:.4f} at teacher.price_per_1m_*_tokens)")
    if rows is None:
        print("(no export yet: `distill export` first to see what each version would reuse and buy)")


def cmd_check_config(args, cfg: PipelineConfig) -> None:
    """The validated config (secrets masked), then one line per finding; exit status 1 on any error."""
    from distill_pipeline.config import resolve_config_file
    from distill_pipeline.masking import mask_url
    from distill_pipeline.preflight import run_checks

    print(json.dumps(cfg.model_dump(mode="json"), indent=2))  # SecretStr dumps as '**********'
    findings = run_checks(cfg, resolve_config_file(args.config), ping_teacher=args.ping_teacher)
    print()
    for finding in findings:
        print(mask_url(finding.line()))  # a finding never carries the URL's password; masked again anyway
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"\ncheck-config: {errors} error(s), {warnings} warning(s)")
    if errors:
        sys.exit(1)


def cmd_export(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.clients.postgres import Database
    from distill_pipeline.stages.source_rows import build_source_rows, result_dict

    print(json.dumps(result_dict(build_source_rows(cfg, Database.from_config(cfg))), indent=2, default=str))


def cmd_curate(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.stages.curated_examples import build_curated_examples

    print(json.dumps(build_curated_examples(cfg, args.prompt_version)[1], indent=2))


def cmd_split(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.stages.dataset_splits import build_dataset_splits

    print(json.dumps(build_dataset_splits(cfg, args.prompt_version), indent=2))


def cmd_export_gguf(args, cfg: PipelineConfig) -> None:
    """Any adapter (with its base) or HF model directory to GGUF, outside Dagster."""
    import tempfile

    from distill_pipeline.stages import gguf_export, student_model
    from distill_pipeline.workers.gguf import merge_adapter

    source = Path(args.source).expanduser()
    if not source.is_dir():
        raise UserError(f"{source} is not a directory (an adapter folder or a Hugging Face model folder)")
    out = Path(args.out).expanduser() if args.out else source.with_suffix(f".{args.type.lower()}.gguf")
    with tempfile.TemporaryDirectory(prefix="distill-merge-") as tmp:
        model_dir = source
        if (source / student_model.ADAPTER_CONFIG).is_file():
            base = cfg.train.base_model if args.base is None else cfg.train.base_model.model_copy(
                update={"source": args.base, "gguf_file": None})
            location = student_model.prepare_base(base, base.cache_root())
            model_dir = Path(tmp) / "merged"
            print(f"merging {source} into {location}", flush=True)
            merge_adapter(location, source, model_dir, base.chat_template)
        elif not (source / "config.json").is_file():
            raise UserError(f"{source} holds neither an adapter ({student_model.ADAPTER_CONFIG}) nor a model "
                            "(config.json)")
        try:
            info = gguf_export.write_gguf(model_dir, out, args.type)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    print(json.dumps({"path": str(out), "size_mb": round(info.size_bytes / 1e6, 1), "type": info.out_type,
                      "sha256": info.sha256}))


def serving_target(cfg: PipelineConfig, prompt_version: str | None) -> tuple[str, dict]:
    """(prompt version, gguf_model manifest) of the version asked for, else of the champion."""
    from distill_pipeline.clients.tracking import ModelRegistry, resolve_tracking_uri
    from distill_pipeline.stages.gguf_model import MANIFEST

    if prompt_version is None:
        champion = ModelRegistry(resolve_tracking_uri(cfg)).champion(cfg.eval.registered_model)
        if champion is None or not champion.get("prompt_version"):
            raise UserError(f"{cfg.eval.registered_model} has no champion yet: pass a prompt version, or "
                            "materialize eval_report and gguf_model until a student passes the gate")
        prompt_version = champion["prompt_version"]
    path = cfg.stage_dir("gguf_model", prompt_version) / MANIFEST
    if not path.is_file():
        raise UserError(f"no GGUF for {prompt_version} ({path} is missing): materialize gguf_model "
                        f"--partition {prompt_version}")
    manifest = json.loads(path.read_text())
    if not manifest.get("passed"):
        raise UserError(f"the GGUF of {prompt_version} failed its parity check: {'; '.join(manifest['reasons'])}")
    return prompt_version, manifest


def cmd_serve(args, cfg: PipelineConfig) -> None:
    from distill_pipeline.serving import StudentModel, make_server, template_pattern
    from distill_pipeline.stages.gguf_model import GRAMMAR

    pv, manifest = serving_target(cfg, args.prompt_version)
    gguf = Path(manifest["gguf_path"])
    grammar_file = gguf.parent / GRAMMAR
    template = manifest.get("user_template")
    student = StudentModel(gguf, grammar_file.read_text().rstrip("\n") if grammar_file.is_file() else None,
                           instruction=manifest.get("instruction"),
                           user_pattern=template_pattern(template) if template else None,
                           name=f"{cfg.eval.registered_model}:{pv}", context=cfg.gguf.serve_context,
                           max_tokens=cfg.eval.max_new_tokens)
    server = make_server(student, args.host, args.port or cfg.gguf.serve_port)
    host, port = server.server_address[:2]
    print(f"serving {gguf.name} ({pv}) at http://{host}:{port}/v1 -- point the teacher's OpenAI client here "
          "(base_url); Ctrl-C stops", flush=True)
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (docker stop, systemd) ends it like Ctrl-C, whatever llama.cpp installed

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: $DISTILL_CONFIG or the demo config)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="seed the demo table and materialize the whole graph")
    demo.add_argument("--rows", type=int, default=5000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--stop-after", metavar="ASSET", help="materialize each prompt version only up to this asset")
    demo.set_defaults(func=cmd_demo)
    mat = sub.add_parser("materialize", help="materialize assets through Dagster")
    mat.add_argument("assets", nargs="*")
    mat.add_argument("--partition", help="prompt version key (see `distill prompts`)")
    mat.add_argument("--all-versions", action="store_true",
                     help="materialize the prompt-version assets for every version in prompts_dir")
    mat.set_defaults(func=cmd_materialize)
    seed = sub.add_parser("seed-demo", help="create and fill the demo table")
    seed.add_argument("--rows", type=int, default=5000)
    seed.add_argument("--seed", type=int, default=7)
    seed.set_defaults(func=cmd_seed)
    sub.add_parser("prompts", help="list prompt versions").set_defaults(func=cmd_prompts)
    check = sub.add_parser("check-config", help="check the config against the database, prompts and teacher")
    check.add_argument("--ping-teacher", action="store_true",
                       help="also ask teacher.base_url for /models (a 1-token completion if it has none)")
    check.set_defaults(func=cmd_check_config)
    sub.add_parser("export", help="run source_rows without Dagster").set_defaults(func=cmd_export)
    gguf = sub.add_parser("export-gguf", help="write an adapter (merged into its base) or a model folder as GGUF")
    gguf.add_argument("source", help="an adapter folder (adapter_config.json) or a Hugging Face model folder")
    gguf.add_argument("--out", help="the GGUF file to write (default: next to SOURCE)")
    gguf.add_argument("--type", default="F16", help="F32, F16, BF16, Q8_0, Q5_0 or Q4_0 (default F16)")
    gguf.add_argument("--base", help="the adapter's base model (default: train.base_model of the config)")
    gguf.set_defaults(func=cmd_export_gguf)
    serve = sub.add_parser("serve", help="the champion student's GGUF behind an OpenAI-compatible API")
    serve.add_argument("prompt_version", nargs="?", help="serve this version's GGUF (default: the champion's)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, help="default: gguf.serve_port")
    serve.set_defaults(func=cmd_serve)
    for name, func in (("curate", cmd_curate), ("split", cmd_split)):
        p = sub.add_parser(name, help=f"run the {name} stage without Dagster")
        p.add_argument("prompt_version")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in LOGGED_COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    from distill_pipeline.stages.prompts import PromptError

    try:
        cfg = load_config(args.config)
        if args.command in LOGGED_COMMANDS:
            # The terminal gets the stage lines and bars; Dagster's log and all other output, the log file.
            with console.session(cfg.home, args.command) as session:
                console.say(f"full log: {session.log_path}")
                args.func(args, cfg)
        else:
            args.func(args, cfg)
    except (ConfigError, UserError, PromptError, ConnectionError, FileNotFoundError) as exc:
        # User errors (a setting, a prompt file, an unreachable database, a stage not run yet): one line,
        # exit status 2. Anything else is a bug and keeps its traceback.
        from distill_pipeline.masking import mask_url

        message = str(exc)
        setting = getattr(exc, "setting", None)  # e.g. the export's SourceTableError
        if setting:
            from distill_pipeline.config import resolve_config_file
            from distill_pipeline.preflight import setting_origin

            message += f" ({setting} {setting_origin(setting, resolve_config_file(args.config))})"
        print(f"distill: {mask_url(message)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
