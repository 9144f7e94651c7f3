"""Dense baseline: no compression, the reference row of every table.

Runs ``train`` and ``evaluate`` only; ``compress`` and ``finetune`` are recorded as skipped.
Config keys: ``sparsity`` must stay 0 (kept for a uniform schema across methods).
"""

from __future__ import annotations

from compress_run.methods.base import Method


class Dense(Method):
    stages = ("train", "evaluate")

    def __init__(self, sparsity: float = 0.0, distribution: str = "uniform", pattern: str = "irregular",
                 exclude: list[str] | tuple[str, ...] = (), mask_grads: bool = True) -> None:
        if sparsity:
            raise ValueError(f"method.sparsity={sparsity!r} is not allowed for method=dense; allowed: 0.0 "
                             "(choose method=magnitude or method=gmp to prune)")
