"""The one rule for secrets: which settings are credentials, and how text is masked before it
reaches a log, an MLflow param, Dagster metadata or a pod spec."""

from __future__ import annotations

import re

# Names of settings that carry credentials, matched on whole words: HF_TOKEN is one, but
# TOKENIZERS_PARALLELISM or max_new_tokens are not.
_SECRET_WORDS = {"password", "passwd", "pwd", "secret", "token", "apikey"}
_SECRET_PAIR = re.compile(r"(^|_)(api|access|private|secret|auth)_key($|_)")
# scheme://user:password@host -- a URL with an inline password.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s:]*:)[^/@\s]+@")
# ...?password=... in a libpq/SQLAlchemy URL's query string.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)[^&\s]+")


def is_secret_name(name: str) -> bool:
    """True for a setting name that denotes a credential (HF_TOKEN, teacher.api_key, DATABASE_URL)."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    joined = "_".join(words)
    return (any(w.endswith(("password", "passwd", "token", "secret")) or w in _SECRET_WORDS for w in words)
            or bool(_SECRET_PAIR.search(joined)) or joined == "database_url")


def has_url_password(value: str | None) -> bool:
    return bool(value) and bool(_URL_PASSWORD.search(str(value)) or _QUERY_PASSWORD.search(str(value)))


def looks_secret(name: str, value: str | None = None) -> bool:
    """True for a setting that must not appear in logs, params or a pod spec."""
    return is_secret_name(name) or has_url_password(value)


def mask_url(text: str) -> str:
    """`text` with every URL password (`scheme://user:password@`, `?password=`) replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("head") + "***", text)


def mask(text: str, *secrets: str | None) -> str:
    """`text` with URL passwords and each given secret value replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return mask_url(text)
