"""Every side effect behind a small class: Postgres, teacher, compute, tracking."""
