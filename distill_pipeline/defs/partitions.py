import dagster as dg

# One partition per teacher prompt version; keys are `<slug>-<hash8>`, comma-free.
prompt_versions = dg.DynamicPartitionsDefinition(name="prompt_version")
