"""Credentials never leave the process in a URI: they are split off where a URI is read.

A tracking URI may carry them (`https://user:secret@host`). MLflow takes them from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead, so the URI that is logged as a param, saved
in config.json / a checkpoint's config.yaml, written into the offline buffer's header or printed in a
warning is the one without them.
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without user:password@, user, password); a URI without credentials comes back unchanged."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) or None


def redact(uri: str | None) -> str | None:
    """The URI as it may be shown: user and password replaced by ***."""
    if not uri or "://" not in uri:
        return uri
    clean, user, password = split_credentials(uri)
    if user is None and password is None:
        return uri
    parts = urlsplit(clean)
    return urlunsplit(parts._replace(netloc=f"{REDACTED}:{REDACTED}@{parts.netloc}"))


def export_tracking_credentials(uri: str, environ=os.environ) -> str:
    """Move a tracking URI's credentials into MLflow's variables (an explicit variable wins); return the
    URI without them."""
    clean, user, password = split_credentials(uri)
    if user is not None:
        environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    if password is not None:
        environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return clean
