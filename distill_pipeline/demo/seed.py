"""Create and fill the demo table of teacher outputs in Postgres (idempotent)."""

from __future__ import annotations

from pathlib import Path

from distill_pipeline.clients.postgres import Database, quote_ident, quote_table
from distill_pipeline.demo.data import SPREAD_DAYS, generate_rows
from distill_pipeline.stages.prompts import PromptVersion, load_prompts


def demo_prompt_versions(prompts_dir: Path) -> list[PromptVersion]:
    """The demo's two prompt versions, in file order (v1 = the stored outputs, v2 = the edited prompt)."""
    versions = sorted(load_prompts(prompts_dir).values(), key=lambda v: v.path.name)
    if len(versions) < 2:
        raise ValueError(f"the demo needs two prompt files in {prompts_dir}, found {len(versions)}")
    return versions[:2]


def demo_prompt_keys(prompts_dir: Path) -> tuple[str, str]:
    v1, v2 = demo_prompt_versions(prompts_dir)
    return v1.key, v2.key


def stored_names(prompts_dir: Path) -> tuple[str, str]:
    """The names the demo table stores its answers under, as a team's table would (`stored_as`)."""
    v1, v2 = demo_prompt_versions(prompts_dir)
    return tuple(v.stored_as[0] if v.stored_as else v.key for v in (v1, v2))


def create_table(db: Database, table: str) -> None:
    name = quote_table(table)
    index = quote_ident(table.split(".")[-1] + "_created_at_id")
    with db.connect() as conn:
        conn.execute(f"""
            CREATE TABLE IF NOT EXISTS {name} (
                id             bigint PRIMARY KEY,
                sentence       text,
                teacher_output text,
                confidence     real,
                prompt_version text,
                created_at     timestamptz NOT NULL
            )""")
        conn.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {name} (created_at, id)")


def seed_demo_table(db: Database, table: str, prompts_dir: Path, rows: int = 5000, seed: int = 7,
                    spread_days: float = SPREAD_DAYS, first_id: int = 1) -> int:
    """Insert the demo rows with ids first_id.. (existing ids are left alone). Returns rows inserted."""
    create_table(db, table)
    versions = stored_names(prompts_dir)
    name = quote_table(table)
    with db.connect() as conn:
        conn.execute("CREATE TEMP TABLE demo_load (LIKE " + name + " INCLUDING DEFAULTS) ON COMMIT DROP")
        with conn.cursor().copy(
            "COPY demo_load (id, sentence, teacher_output, confidence, prompt_version, created_at) FROM STDIN"
        ) as copy:
            for i, row in enumerate(generate_rows(rows, seed, versions, spread_days=spread_days)):
                copy.write_row((first_id + i, row.sentence, row.teacher_output, row.confidence,
                                row.prompt_version, row.created_at))
        cur = conn.execute(f"INSERT INTO {name} SELECT * FROM demo_load ON CONFLICT (id) DO NOTHING")
        inserted = cur.rowcount
        conn.commit()
    return inserted
