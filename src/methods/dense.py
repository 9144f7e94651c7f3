"""Dense baseline: no compression, the reference row of every table.

Runs ``train`` and ``evaluate`` only; ``compress`` and ``finetune`` are recorded as skipped. No config keys.
"""

from __future__ import annotations

from compress_run.methods.base import Method, MethodConfig, method_config


class Dense(Method):
    Config = method_config("dense")(MethodConfig)
    stages = ("train", "evaluate")
