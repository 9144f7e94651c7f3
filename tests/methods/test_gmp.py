"""GMP: the cubic schedule (Zhu & Gupta 2017) and monotone masks."""

from __future__ import annotations

import pytest

from compress_run.methods.gmp import cubic_sparsity


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0, 100, 0.9) == 0.0
    assert cubic_sparsity(100, 0, 100, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(250, 0, 100, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(50, 0, 100, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert cubic_sparsity(30, 20, 60, 0.8) == pytest.approx(0.8 * (1 - 0.75 ** 3))
    values = [cubic_sparsity(t, 10, 90, 0.95) for t in range(0, 100)]
    assert values == sorted(values)
    # cubic: steep early, flat late
    assert values[20] - values[10] > values[90] - values[80]
