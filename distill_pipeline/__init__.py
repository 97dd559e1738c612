"""distill_pipeline: teacher-LLM outputs -> curated splits -> LoRA student -> GGUF, on Dagster."""

import os
import sys

# Arrow's jemalloc pool hands freed memory back where its default (mimalloc) keeps it per thread: the
# threaded export peaks ~60 MB lower at the same speed (docs/benchmarks.md). Read when pyarrow first
# allocates, so it only takes effect if nothing used pyarrow before; an explicit setting wins. Linux only:
# not every macOS/Windows wheel is built with jemalloc, and Arrow warns when the pool is missing.
if sys.platform.startswith("linux"):
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

__version__ = "0.1.0"
