"""Conversions between epoch milliseconds (the event model's unit) and datetimes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_millis(ms: int) -> datetime:
    """Epoch milliseconds → timezone-aware UTC datetime (exact)."""
    return EPOCH + timedelta(milliseconds=ms)


def to_millis(dt: datetime) -> int:
    """Timezone-aware datetime → epoch milliseconds (exact, floors sub-millisecond parts)."""
    return (dt - EPOCH) // timedelta(milliseconds=1)


def now_millis() -> int:
    """The current wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    """Epoch milliseconds → ISO 8601 UTC with milliseconds, e.g. ``2026-01-01T00:00:00.000Z``."""
    return from_millis(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")
