"""Dagster resources: thin handles on the pipeline config and the clients built from it."""

from __future__ import annotations


import dagster as dg
from pydantic import PrivateAttr

from distill_pipeline.clients.postgres import Database
from distill_pipeline.config import PipelineConfig, load_config


class SettingsResource(dg.ConfigurableResource):
    """The pipeline config. None -> $DISTILL_CONFIG, else the shipped demo config.

    Secrets (DATABASE_URL, the teacher API key) come from the environment through
    the config loader or EnvVar, never from Dagster run config.
    """

    config_file: str | None = None
    _config: PipelineConfig | None = PrivateAttr(default=None)

    def load(self) -> PipelineConfig:
        if self._config is None:
            self._config = load_config(self.config_file)
        return self._config


class PostgresResource(dg.ConfigurableResource):
    settings: SettingsResource

    def database(self) -> Database:
        return Database.from_config(self.settings.load())
