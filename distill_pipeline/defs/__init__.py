"""The only code importing dagster: thin assets, checks, partitions, sensors, resources."""
