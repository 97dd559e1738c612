"""Dagster resources: thin handles on the pipeline config and on the clients built from it.

Each side effect has a real implementation and a demo/test one side by side (the teacher); which one
a deployment gets is decided in `definitions.py`, never inside an asset.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
from pydantic import PrivateAttr

from distill_pipeline.clients.compute import BoundCompute, compute_client
from distill_pipeline.clients.postgres import Database
from distill_pipeline.clients.teacher import DemoTeacher, OpenAICompatibleTeacher, TeacherEndpoint
from distill_pipeline.clients.tracking import ExperimentStore, ModelRegistry
from distill_pipeline.config import PipelineConfig, load_config, resolve_config_file


class SettingsResource(dg.ConfigurableResource):
    """The pipeline config: `config_file`, else $DISTILL_CONFIG, else the shipped demo config.

    Secrets (DATABASE_URL, the teacher API key) come from the environment through the config loader
    or EnvVar, never from Dagster run config.
    """

    config_file: str | None = None
    _config: PipelineConfig | None = PrivateAttr(default=None)

    def path(self) -> Path:
        """The file every resource and the training worker read."""
        return resolve_config_file(self.config_file)

    def load(self) -> PipelineConfig:
        if self._config is None:
            self._config = load_config(self.path())
        return self._config


class PostgresResource(dg.ConfigurableResource):
    settings: SettingsResource

    def database(self) -> Database:
        return Database.from_config(self.settings.load())


class TeacherResource(dg.ConfigurableResource):
    """The teacher a labelling run talks to, open for the length of the run."""

    def endpoint(self, cfg: PipelineConfig) -> contextlib.AbstractContextManager[TeacherEndpoint]:
        raise NotImplementedError


class OpenAITeacherResource(TeacherResource):
    """The team's OpenAI-compatible teacher at teacher.base_url.

    Pass the key as `dg.EnvVar(...)` so Dagster keeps the variable's name, never the key; unset, the
    variable named by teacher.api_key_env is read at run time.
    """

    api_key: str | None = None

    @classmethod
    def from_env(cls, name: str) -> "OpenAITeacherResource":
        # dg.EnvVar of an unset variable fails at launch, so only bind it when it is set.
        return cls(api_key=dg.EnvVar(name)) if os.environ.get(name) else cls()

    @contextlib.contextmanager
    def endpoint(self, cfg: PipelineConfig) -> Iterator[TeacherEndpoint]:
        with OpenAICompatibleTeacher(self.api_key).open(cfg.teacher) as endpoint:
            yield endpoint


class DemoTeacherResource(TeacherResource):
    """The demo's stand-in teacher, started for each labelling run on a free loopback port."""

    @contextlib.contextmanager
    def endpoint(self, cfg: PipelineConfig) -> Iterator[TeacherEndpoint]:
        with DemoTeacher().open(cfg.teacher) as endpoint:
            yield endpoint


class ComputeResource(dg.ConfigurableResource):
    """Where training runs. `backend` overrides compute.backend of the pipeline config."""

    settings: SettingsResource
    backend: str | None = None

    def bound(self, context: Any, tracking_uri: str | None = None) -> BoundCompute:
        client = compute_client(self.settings.load(), backend=self.backend, tracking_uri=tracking_uri)
        return BoundCompute(client, context)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking: URI and experiment (None -> tracking.* of the pipeline config)."""

    settings: SettingsResource
    tracking_uri: str | None = None
    experiment: str | None = None

    def store(self) -> ExperimentStore:
        return ExperimentStore.from_config(self.settings.load(), self.tracking_uri, self.experiment)

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.store().tracking_uri)
