"""The process's place in a data-parallel run (set by `accelerate launch` / torchrun): the one rule
for "who writes the adapter, logs to MLflow and reports to Dagster" -- global rank 0."""

from __future__ import annotations

import os
from typing import Mapping


def rank(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("RANK") or 0)


def world_size(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE") or 1)


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    return rank(env) == 0
