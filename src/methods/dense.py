"""Dense baseline: no compression, the reference row of every table.

Runs ``train`` and ``evaluate`` only; ``compress`` and ``finetune`` are recorded as skipped. No config keys.
"""

from __future__ import annotations

from compress_run.methods.base import Method


class Dense(Method):
    stages = ("train", "evaluate")
