"""A team's own table, configured through the documented config only, end to end through the CLI.

Not the demo: a helpdesk ticket-routing table in its own schema with its own column names, answers of two
rubric revisions stored under plain names (rubric-2026-09, rubric-2026-11), a 0-1 confidence score, a JSON
answer with two categorical fields, noise (NULL and empty bodies, malformed JSON, exact duplicates, low
scores), and an OpenAI-compatible teacher that fails 20% of requests. A third prompt version has no stored
answers: it is bought from the teacher, once.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import yaml

from distill_pipeline.clients import tracking
from distill_pipeline.config import load_config
from distill_pipeline.demo.teacher_server import Faults, start_teacher_server
from distill_pipeline.stages.prompts import load_prompt, load_prompts
from distill_pipeline_tests.train_support import demo_tokenizer_dir, tiny_models  # noqa: F401

QUEUES = {
    "billing": ["I was charged twice for order {n} on my {card} card.",
                "Invoice {n} shows ${amount} but our plan is cheaper.",
                "The refund for order {n} never reached my {card} account."],
    "outage": ["The {service} dashboard has been down since {hour}:00.",
               "Every call to the {service} API returns error 503.",
               "Nobody on the {team} team can log in to {service} today."],
    "account": ["Please reset the password for user {name}.",
                "How do I add {name} as a second admin of the {service} workspace?",
                "Our single sign-on stopped accepting {name} after the rename."],
    "shipping": ["Parcel {n} was due on {day} and tracking has not moved.",
                 "The box for order {n} arrived damaged and the {item} is broken.",
                 "We received {amount} units of {item} instead of the ones we ordered."],
}
GREETINGS = ["Hi team,", "Hello,", "Good morning,", "Dear support,", "Hey there,", "To whom it may concern,",
             "Hi,", "Greetings from the {team} desk,"]
DETAILS = ["This is the {amount}th time this month.", "Our customer {name} is waiting on this.",
           "I attached a screenshot from {day}.", "We are on the enterprise plan since {hour} months.",
           "The same happened to my colleague {name}.", "Nothing changed on our side since {day}."]
CLOSINGS = ["Thanks!", "Regards, {name}", "Please advise.", "Cheers", "Thank you in advance.", "Best, the {team} team"]
PRIORITY = {"billing": "normal", "outage": "urgent", "account": "low", "shipping": "normal"}
SLOTS = {"card": ["visa", "amex", "debit"], "service": ["analytics", "billing", "search", "export"],
         "team": ["sales", "support", "finance", "legal"], "name": ["maria.k", "j.osei", "t.nguyen", "a.berg", "r.li"],
         "day": ["monday", "tuesday", "friday", "the 3rd"], "item": ["lamp", "monitor", "kettle", "chair"]}
ROWS = 420
STORED = {"rubric-2026-09": range(0, 200), "rubric-2026-11": range(200, 320)}  # the rest: no stored answer


def ticket_rows(seed: int = 5) -> list[dict]:
    """Rows as the team's table holds them, with the answer a perfect teacher gives for each body."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(ROWS):
        queue = rng.choice(sorted(QUEUES))
        parts = [rng.choice(GREETINGS), rng.choice(QUEUES[queue]), rng.choice(DETAILS), rng.choice(CLOSINGS)]
        body = " ".join(parts).format(n=rng.randint(10_000, 99_999), amount=rng.randint(2, 90),
                                      hour=rng.randint(1, 23), **{k: rng.choice(v) for k, v in SLOTS.items()})
        priority = PRIORITY[queue] if rng.random() < 0.8 else rng.choice(["low", "normal", "urgent"])
        answer = {"queue": queue, "priority": priority}
        if i % 37 == 5 and len(rows) > 3:  # exact duplicates of earlier tickets
            body, answer = rows[-3]["body"], rows[-3]["answer"]
        rubric = next((name for name, ids in STORED.items() if i in ids), None)
        stored = json.dumps(answer) if rubric else None
        if rubric and i % 41 == 7:
            stored = stored[:-5]  # a truncated stored answer: invalid JSON
        score = round(rng.uniform(0.75, 1.0), 3) if rng.random() > 0.08 else round(rng.uniform(0.1, 0.6), 3)
        if i % 53 == 11:
            body = None
        elif i % 59 == 13:
            body = "   "
        rows.append({"ticket_id": 1000 + i, "body": body, "routing_json": stored, "score": score if rubric else None,
                     "rubric": rubric, "opened_at": start + timedelta(minutes=17 * i), "answer": answer})
    return rows


def create_table(db_url: str, rows: list[dict]) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE SCHEMA support")
        conn.execute("CREATE TABLE support.tickets (ticket_id bigint PRIMARY KEY, body text, routing_json text, "
                     "score double precision, rubric text, opened_at timestamptz NOT NULL)")
        with conn.cursor().copy("COPY support.tickets (ticket_id, body, routing_json, score, rubric, opened_at) "
                                "FROM STDIN") as copy:
            for r in rows:
                copy.write_row((r["ticket_id"], r["body"], r["routing_json"], r["score"], r["rubric"], r["opened_at"]))


def write_prompt(folder: Path, name: str, rubric: str, stored_name: str | None) -> None:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "task_kind": "extraction", "teacher": {"model": "gpt-4o-mini", "temperature": 0.0, "max_tokens": 64},
        "system": f"Route the support ticket. {rubric} Answer JSON with queue and priority.",
        "user_template": "Ticket: {input}"}))
    if stored_name:  # bind the stored name to this exact prompt, as `distill prompts` tells a team to
        fingerprint = load_prompt(path).fingerprint
        path.write_text(path.read_text() + f"stored_as:\n  {stored_name}: {fingerprint}\n")


def distill(config: Path, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distill_pipeline.cli", "--config", str(config), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_team_table_end_to_end(tmp_path, db_url, tiny_models):  # noqa: F811
    rows = ticket_rows()
    create_table(db_url, rows)
    prompts = tmp_path / "team" / "prompts"
    prompts.mkdir(parents=True)
    write_prompt(prompts, "routing_2026_09", "Outages are urgent.", "rubric-2026-09")
    write_prompt(prompts, "routing_2026_11", "Outages are urgent; billing disputes are normal.", "rubric-2026-11")
    write_prompt(prompts, "routing_2026_12", "Outages are urgent; anything about money is normal.", None)
    versions = {v.path.stem: v for v in load_prompts(prompts).values()}

    answers = {r["body"].strip(): r["answer"] for r in rows if r["body"] and r["body"].strip()}
    faults = Faults(rate_429=0.05, rate_500=0.05, rate_timeout=0.02, rate_truncated=0.04, rate_nonjson=0.04,
                    retry_after_s=0.05, hang_s=1.5)
    with start_teacher_server(0, answers=answers, faults=faults, fault_seed=3, latency_s=0.005, confidence=None,
                              api_key="helpdesk-key", template="Ticket: {input}") as server:
        config = tmp_path / "team" / "pipeline.yaml"
        config.write_text(yaml.safe_dump({
            "home": str(tmp_path / "home"),
            "prompts_dir": "prompts",
            "source": {"table": "support.tickets",
                       "columns": {"id": "ticket_id", "input": "body", "output": "routing_json", "confidence": "score",
                                   "prompt_version": "rubric", "created_at": "opened_at"}},
            "task": {"kind": "extraction", "skip_key": None, "label_field": ["queue", "priority"],
                     "fields": {"queue": {"enum": sorted(QUEUES)}, "priority": {"enum": ["low", "normal", "urgent"]}}},
            "teacher": {"kind": "openai", "base_url": server.url, "api_key_env": "HELPDESK_TEACHER_KEY",
                        "concurrency": 8, "timeout_s": 1.0, "max_attempts": 10, "backoff_initial_s": 0.02,
                        "backoff_max_s": 0.2, "progress": False, "max_bad_share": 0.2,
                        "price_per_1m_input_tokens": 0.15, "price_per_1m_output_tokens": 0.6},
            "tracking": {"experiment": "helpdesk-routing"},
            "compute": {"local": {"env": {"DISTILL__TRAIN__SAMPLE_COUNT": "1", "OMP_NUM_THREADS": "1"}}},
            "train": {"base_model": {"source": str(tiny_models["qwen2"])}, "max_seq_len": 256, "micro_batch_size": 2,
                      "gradient_accumulation_steps": 1, "max_steps": 2, "eval_steps": 2, "learning_rate": 5e-3,
                      "warmup_ratio": 0.0, "lr_scheduler": "constant", "early_stopping_patience": None,
                      "sample_count": 0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        }))
        decoy = tmp_path / "decoy.yaml"  # $DISTILL_CONFIG names another file: --config must win everywhere
        decoy.write_text(f"home: {tmp_path / 'decoy-home'}\ntracking:\n  experiment: decoy\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL", "DAGSTER_HOME", "MLFLOW_"))}
        env.update(DISTILL_CONFIG=str(decoy), DATABASE_URL=db_url, HELPDESK_TEACHER_KEY="helpdesk-key")
        cfg = load_config(config, env={"DATABASE_URL": db_url})

        distill(config, "materialize", cwd=tmp_path, env=env)  # the export

        # What each version will reuse and buy, before anything is sent (computed here from the rows).
        valid = [r for r in rows if r["body"] and r["body"].strip()]
        expected_buy = {}
        for stem, stored_name in (("routing_2026_09", "rubric-2026-09"), ("routing_2026_11", "rubric-2026-11"),
                                  ("routing_2026_12", None)):
            answered = {r["body"] for r in valid if r["rubric"] == stored_name and r["routing_json"] is not None}
            expected_buy[stem] = len({r["body"] for r in valid} - answered)
        shown = distill(config, "prompts", cwd=tmp_path, env=env).stdout
        for stem, count in expected_buy.items():
            block = shown.split(versions[stem].key, 1)[1].split("\nrouting_", 1)[0]
            assert f"{count} to buy" in block, shown
        assert server.stats()["requests"] == 0

        distill(config, "materialize", "--all-versions", "teacher_labels", "curated_examples", "dataset_splits",
                cwd=tmp_path, env=env)
        stats = server.stats()
        print(f"team table: to buy {expected_buy}; teacher requests {stats['requests']}, outcomes {stats['outcomes']}")
        # Every input without a stored answer of its version was bought exactly once, despite the faults.
        assert stats["outcomes"]["ok"] == sum(expected_buy.values())
        assert sum(v for k, v in stats["outcomes"].items() if k != "ok") > 0.1 * stats["requests"]
        for stem, version in versions.items():
            labels = pq.read_table(cfg.stage_dir("teacher_labels", version.key) / "labels.parquet").to_pylist()
            assert sum(1 for r in labels if r["source"] == "requested") == expected_buy[stem]
            assert all(r["status"] in ("ok", "invalid", "invalid_input") for r in labels)  # none failed for good
            reused = sum(1 for r in labels if r["source"] == "reused")
            assert reused > 100 if stem != "routing_2026_12" else reused == 0
            manifest = json.loads((cfg.stage_dir("curated_examples", version.key) / "manifest.json").read_text())
            counts = manifest["counts"]
            # the 0-1 score is recognised: only the genuinely low scores are dropped, not the whole table
            assert counts["confidence_scale"] == "0-1" and counts["min_confidence"] == 0.7
            low = counts.get("dropped_low_confidence", 0)
            assert (0 < low < 0.15 * counts["rows_in"]) if reused else low == 0  # teacher answers carry no score
            assert counts["kept"] > 0.5 * counts["rows_in"]
            train = pq.read_table(cfg.stage_dir("dataset_splits", version.key) / "train.parquet")
            assert all(label.startswith("queue=") and "|priority=" in label
                       for label in train.column("label").to_pylist())

        # A second night pays nothing: everything is reused or in the label cache.
        distill(config, "materialize", "--all-versions", "teacher_labels", cwd=tmp_path, env=env)
        assert server.stats()["requests"] == stats["requests"]

        key = versions["routing_2026_12"].key
        distill(config, "materialize", "student_adapter", "--partition", key, cwd=tmp_path, env=env)

    assert not (tmp_path / "decoy-home").exists()
    output_dir = cfg.stage_dir("student_adapter", key)
    assert len(json.loads((output_dir / "train_result.json").read_text())["samples"]) == 1  # compute.local.env
    client = tracking.mlflow_client(tracking.resolve_tracking_uri(cfg, env={}))
    experiment = client.get_experiment_by_name("helpdesk-routing")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].data.tags["dagster.partition"] == key
    assert runs[0].data.params["task.kind"] == "extraction" and runs[0].data.params["train.max_steps"] == "2"
