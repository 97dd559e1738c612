"""The pipeline's logic as plain functions. Nothing here imports dagster."""
