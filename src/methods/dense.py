"""Dense baseline: no compression, the reference row of every table.

Runs ``train`` and ``evaluate`` only; ``compress`` and ``finetune`` are recorded as skipped. No config keys.

Reference code: none (no paper and no method to follow; plain training). Deviations: none known
(docs/fidelity.md, section dense).
"""

from __future__ import annotations

from compress_run.methods.base import Method, MethodConfig, method_config


class Dense(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    Config = method_config("dense")(MethodConfig)
    stages = ("train", "evaluate")
    tasks = ("classification", "causal_lm")
