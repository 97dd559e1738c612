"""The Dagster code location: every stage's definitions merged, plus the resources they share."""

import dagster as dg

from distill_pipeline.defs import data, schedules
from distill_pipeline.defs.resources import PostgresResource, SettingsResource

settings = SettingsResource()

defs = dg.Definitions.merge(
    data.defs,
    schedules.defs,
    dg.Definitions(resources={"settings": settings, "postgres": PostgresResource(settings=settings)}),
)
