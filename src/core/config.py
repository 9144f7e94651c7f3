"""The one range-check helper every config schema uses (the shared groups in the pipeline, each method's own
config beside its algorithm): a failed check names the key, the value and what is allowed."""

from __future__ import annotations

from typing import Any


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ValueError ``key=value is not allowed; allowed: ...`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {allowed}")
