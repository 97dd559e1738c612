"""distill_pipeline: teacher-LLM outputs -> curated splits -> LoRA student -> GGUF, on Dagster."""

__version__ = "0.1.0"
