"""Tracking URIs in messages: any user:password part taken out.

Apart from ``orchestrator.tracking`` because it needs no MLflow: ``capi sweep status`` prints the
store's URI without importing MLflow (seconds).
"""

from __future__ import annotations

from urllib.parse import urlparse


def safe_uri(uri: str) -> str:
    """``uri`` without any user:password part, for messages."""
    parsed = urlparse(uri)
    if parsed.password is None and parsed.username is None:
        return uri
    return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
