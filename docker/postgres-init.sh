#!/bin/sh
# Runs once, on the first start of the Postgres container: one database and role per service.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE dagster LOGIN PASSWORD '${DAGSTER_PG_PASSWORD}';
CREATE DATABASE dagster OWNER dagster;
CREATE ROLE mlflow LOGIN PASSWORD '${MLFLOW_PG_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
SQL
