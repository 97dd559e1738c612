"""The Dagster code location: every stage's definitions merged, plus the resources they share."""

import dagster as dg

from distill_pipeline.defs import data, schedules, teacher, training
from distill_pipeline.defs.resources import PostgresResource, SettingsResource
from distill_pipeline.defs.teacher import TeacherResource
from distill_pipeline.defs.training import ComputeResource, MlflowResource

settings = SettingsResource()

defs = dg.Definitions.merge(
    data.defs,
    teacher.defs,
    training.defs,
    schedules.defs,
    dg.Definitions(resources={
        "settings": settings,
        "postgres": PostgresResource(settings=settings),
        "teacher": TeacherResource.from_env(),  # API key via EnvVar, only when the variable is set
        "compute": ComputeResource(settings=settings),  # local subprocess or Kubernetes pod, through Pipes
        "mlflow": MlflowResource(settings=settings),
    }),
)
