"""The operator's settings from its environment (the chart's `operator.settings` and friends)."""
from __future__ import annotations

import os


class SettingError(ValueError):
    pass


def number(name: str, default: float) -> float:
    """Unset or empty gives the default: `helm upgrade --reuse-values` over a chart that added a
    setting renders its variable empty. Anything else must be a number, or the operator stops at
    start with one line naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        return float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number (the chart's operator settings)") from None


def flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{name}={raw!r} is not true or false (the chart's operator settings)")


def words(name: str) -> tuple[str, ...]:
    """A comma-separated list; unset or empty: ()."""
    return tuple(w.strip() for w in os.environ.get(name, "").split(",") if w.strip())


def user(name: str, default: int | None) -> int | None:
    """A UID: a number, or 'platform' (None: the platform assigns it, as OpenShift does)."""
    raw = os.environ.get(name, "").strip()
    if raw.lower() == "platform":
        return None
    return int(number(name, default)) if raw else default
