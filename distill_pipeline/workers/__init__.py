"""Process entry points (training worker); run with `python -m` or under `accelerate launch`."""
