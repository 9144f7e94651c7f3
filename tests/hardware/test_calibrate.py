"""Calibration: the fit recovers known parameters; the real sweep code runs on a tiny sweep."""

from __future__ import annotations

import subprocess
import sys

import pytest

from compress_run.hardware import calibrate
from compress_run.hardware.profile import load_profile
from tests.conftest import REPO


def test_weighted_fit_recovers_exact_coefficients_and_stays_non_negative():
    xs = [1e6, 5e6, 2e7, 8e7, 3e8]
    ys = [3.0e3, 1e4, 5e3, 2e5, 7e4]
    ts = [20e-6 + x * 5e-12 + y * 1e-10 for x, y in zip(xs, ys, strict=True)]
    a, b, c = calibrate._wls([[1.0] * 5, xs, ys], ts)
    assert a == pytest.approx(20e-6, rel=1e-6) and b == pytest.approx(5e-12, rel=1e-6)
    assert c == pytest.approx(1e-10, rel=1e-6)
    # a negative best-fit coefficient is dropped, not returned
    a, b = calibrate._wls([[1.0] * 3, [1.0, 2.0, 3.0]], [3.0, 2.0, 1.0])
    assert a >= 0 and b >= 0


def test_tiny_calibration_writes_a_valid_profile(tmp_path):
    out = tmp_path / "host.yaml"
    script = REPO / "scripts" / "calibrate_hardware.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from omegaconf import OmegaConf

    profile = load_profile(OmegaConf.load(out))
    assert profile.name == "host_cpu" and profile.calibrated
    assert profile.peak("conv") > 0 and profile.kernel_overhead_us > 0 and "csr" in profile.sparse_formats
    assert "Median relative error" in out.read_text()
