"""The Dagster code location: the assets, what starts them, and the resources they share.

`build_defs(config_file)` is the one place where implementations are chosen: every resource reads
the same config file (the CLI's --config, else $DISTILL_CONFIG, else the demo config), and the
teacher is the team's endpoint or the demo's stand-in, as that config says.
"""

from __future__ import annotations

import dagster as dg

from distill_pipeline.defs import assets, automation
from distill_pipeline.defs.resources import (ComputeResource, DemoTeacherResource, MlflowResource,
                                             OpenAITeacherResource, PostgresResource, SettingsResource)


def build_defs(config_file: str | None = None) -> dg.Definitions:
    settings = SettingsResource(config_file=config_file)
    cfg = settings.load()
    teacher_cfg = cfg.teacher
    teacher = DemoTeacherResource() if teacher_cfg.kind == "demo" else OpenAITeacherResource.from_env(teacher_cfg.api_key_env)
    return dg.Definitions(
        assets=dg.load_assets_from_modules([assets]),
        jobs=[automation.export_job, automation.refresh_job],
        schedules=[automation.nightly_schedule(cfg.nightly)],
        sensors=[automation.prompt_versions_sensor, automation.refresh_after_export, automation.alert_on_failure],
        resources={
            "settings": settings,
            "postgres": PostgresResource(settings=settings),
            "teacher": teacher,
            "compute": ComputeResource(settings=settings),  # local subprocess or Kubernetes pod, through Pipes
            "mlflow": MlflowResource(settings=settings),
        },
    )


defs = build_defs()
