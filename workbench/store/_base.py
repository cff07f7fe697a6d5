"""What every part of the store shares: its error, UTC times, and URLs safe to print."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy.engine import URL

from workbench.errors import WorkbenchError

UTC = dt.timezone.utc


class StoreError(WorkbenchError):
    """A store problem explained in one line that names the bad value and the fix."""


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _to_utc(value: Any) -> dt.datetime:
    """An aware UTC datetime from a datetime (naive means UTC), a pandas Timestamp or an ISO string."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise StoreError(
                f"created_at={value!r} is not an ISO datetime; use e.g. 2024-05-01T12:00:00Z"
            ) from None
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if not isinstance(value, dt.datetime):
        raise StoreError(f"created_at={value!r} is not a datetime; pass a datetime or an ISO string")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _mask_password(text: str) -> str:
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", text)


def _first_line(err: object, secret: str | None = None) -> str:
    """The first non-empty line of an error message, with any password blanked out."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if secret:
        text = text.replace(str(secret), "***")
    return _mask_password(text)
