"""trainer=ddp_cpu: two gloo processes; masks (method state) must agree on every rank."""

from __future__ import annotations

import pytest

from tests.conftest import read_json


@pytest.mark.slow
def test_ddp_cpu_gmp_run_keeps_masks_identical_across_ranks(cli, tmp_path):
    # MaskEnforcer all-gathers mask checksums at the end of every fit and raises if ranks disagree
    proc = cli("trainer=ddp_cpu", "dataset=digits", "debug=smoke", "method=gmp", "logger=none",
               f"output_dir={tmp_path / 'run'}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(tmp_path / "run" / "results.json")
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.9) < 1e-3
    assert results["config"]["trainer"]["devices"] == 2
