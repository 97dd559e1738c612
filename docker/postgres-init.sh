#!/bin/sh
# Runs once, on the first start of the Postgres container: one database and role per service.
# The names default to the ones docker-compose.yml passes the services; psql's :"name" and :'value'
# quote them, so a password may hold any character.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v dagster_user="${DAGSTER_PG_USER:-dagster}" -v dagster_db="${DAGSTER_PG_DB:-dagster}" \
  -v dagster_password="${DAGSTER_PG_PASSWORD}" \
  -v mlflow_user="${MLFLOW_PG_USER:-mlflow}" -v mlflow_db="${MLFLOW_PG_DB:-mlflow}" \
  -v mlflow_password="${MLFLOW_PG_PASSWORD}" <<'SQL'
CREATE ROLE :"dagster_user" LOGIN PASSWORD :'dagster_password';
CREATE DATABASE :"dagster_db" OWNER :"dagster_user";
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
SQL
