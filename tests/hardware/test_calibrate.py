"""Calibration: the fit recovers known parameters; the real sweep code runs on a tiny sweep."""

from __future__ import annotations

import json
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


@pytest.mark.slow  # an integration test of minutes: in CI's slow set
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


# --------------------------------------------------------------- sparse formats from the kernel benchmark
PEAKS = {"conv": 0.2, "gemm": 0.25, "elementwise": 0.01}
TRUE = {"csr": (0.05, 0.12), "bsr_4": (0.02, 0.3), "gs": (0.01, 0.6)}  # kernel -> (fixed, efficiency)


def _bench_rows() -> list[dict]:
    """Benchmark rows whose kernel times follow the sparse model exactly (no operand term)."""
    layers = {"conv": ({"module": "Conv2d", "kwargs": {"in_channels": 32, "out_channels": 48, "kernel_size": 3,
                                                           "padding": 1}}, [32, 14, 14]),
              "fc": ({"module": "Linear", "kwargs": {"in_features": 96, "out_features": 64}}, [20, 96])}
    rows = []
    for name, (spec, shape) in layers.items():
        for batch in (1, 4):
            op = calibrate._main_op(calibrate.bench_layer(spec), (batch, *shape))
            mac_time = 2 * op.macs / (PEAKS.get(op.kind, PEAKS["conv"]) * 1e12)
            dense = 1.7 * mac_time
            for density in (0.02, 0.05, 0.1, 0.2):
                ms = {"dense": dense * 1e3}
                for kernel, (fixed, eff) in TRUE.items():
                    ms[kernel] = (fixed * dense + density * mac_time / eff) * 1e3
                rows.append({"shape": name, "layer": spec, "input": shape, "batch": batch, "sparsity": 1 - density,
                             "density": {k: density for k in TRUE}, "ms": ms})
    return rows


def test_sparse_formats_are_fitted_from_benchmark_rows():
    samples = calibrate.sparse_samples_from_bench({"rows": _bench_rows()})
    assert {fmt for fmt, rows in samples.items() if rows} == {"csr", "bsr_4", "gather_scatter"}
    formats, errors = calibrate.fit_sparse_formats(samples, PEAKS)
    for kernel, (fixed, eff) in TRUE.items():
        fitted = formats[calibrate.BENCH_FORMATS[kernel]]
        assert fitted["efficiency"] == pytest.approx(eff, rel=1e-3)
        assert fitted["fixed"] == pytest.approx(fixed, abs=1e-3)
    assert max(errors.values()) < 1e-3


def test_old_or_foreign_benchmark_json_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="rerun"):
        calibrate.sparse_samples_from_bench({"rows": [{"shape": "x", "ms": {"dense": 1.0}}]})
    with pytest.raises(ValueError, match="rerun that script"):
        calibrate.bench_layer({"module": "Sequential", "kwargs": {}})


@pytest.mark.slow  # an integration run (~30 s): in `make test-slow`
def test_sparse_only_refit_rewrites_sparse_formats_and_keeps_the_rest(tmp_path):
    from omegaconf import OmegaConf

    profile_path = tmp_path / "host.yaml"
    original = (REPO / "conf" / "hardware" / "host_cpu.yaml").read_text()
    profile_path.write_text(original)
    before = OmegaConf.to_container(OmegaConf.create(original))
    bench = {"date": "2026-01-01T00:00:00+00:00", "threads": before["threads"], "rows": _bench_rows()}
    bench_path = tmp_path / "bench.json"
    bench_path.write_text(json.dumps(bench))
    script = REPO / "scripts" / "calibrate_hardware.py"
    args = [sys.executable, str(script), "--sparse-from", str(bench_path), "--sparse-only", "--out", str(profile_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = OmegaConf.to_container(OmegaConf.load(profile_path))
    load_profile(OmegaConf.load(profile_path))
    assert set(after["sparse_formats"]) == {"csr", "bsr_4", "gather_scatter"}
    peaks = before["peak_tflops"]["fp32"]
    assert after["sparse_formats"]["gather_scatter"]["efficiency"] == pytest.approx(
        calibrate.fit_sparse_formats(calibrate.sparse_samples_from_bench(bench), peaks)[0]["gather_scatter"]
        ["efficiency"])
    assert {k: v for k, v in after.items() if k != "sparse_formats"} == \
        {k: v for k, v in before.items() if k != "sparse_formats"}
    assert "re-fitted from" in profile_path.read_text()
    # a benchmark measured with another thread count than the profile is refused, the profile left alone
    bench["threads"] = before["threads"] + 1
    bench_path.write_text(json.dumps(bench))
    text = profile_path.read_text()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--threads" in proc.stderr
    assert profile_path.read_text() == text


def test_selection_fit_recovers_the_per_element_cost_with_the_hosts_drift_divided_out():
    from compress_run.hardware.trace import OpRecord

    overhead, per_element, drift = 2e-6, 6e-9, 1.7
    samples = {cls: [calibrate.Sample(OpRecord("", cls, cls, work=w), drift * (overhead + 5e-6 + w * per_element))
                     for w in (1e3, 3e4, 2e5, 1e6)] for cls in ("select", "sort")}
    peaks, class_overhead, errors = calibrate.fit_work_classes(samples, ("select", "sort"), overhead, drift)
    assert peaks["select"] == pytest.approx(1e-12 / per_element, rel=1e-6)
    assert class_overhead["sort"] == pytest.approx(5.0, rel=1e-4) and max(errors.values()) < 1e-6


def test_select_only_refit_adds_the_selection_classes_and_keeps_the_rest(tmp_path):
    import os

    from omegaconf import OmegaConf

    profile_path = tmp_path / "host.yaml"
    original = (REPO / "conf" / "hardware" / "host_cpu.yaml").read_text()
    before = OmegaConf.to_container(OmegaConf.create(original))
    for cls in ("select", "sort"):  # as a profile from before these classes existed
        before["peak_tflops"]["fp32"].pop(cls, None)
        before["class_overhead_us"].pop(cls, None)
    profile_path.write_text(OmegaConf.to_yaml(OmegaConf.create(before)))
    script = REPO / "scripts" / "calibrate_hardware.py"
    env = {**os.environ, "OMP_NUM_THREADS": str(before["threads"])}
    proc = subprocess.run([sys.executable, str(script), "--select-only", "--tiny", "--out", str(profile_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = OmegaConf.to_container(OmegaConf.load(profile_path))
    load_profile(OmegaConf.load(profile_path))
    assert after["peak_tflops"]["fp32"]["select"] > 0 and after["peak_tflops"]["fp32"]["sort"] > 0
    assert after["class_overhead_us"]["select"] >= 0 and after["class_overhead_us"]["sort"] >= 0
    new = ("select", "sort")
    after["peak_tflops"]["fp32"] = {k: v for k, v in after["peak_tflops"]["fp32"].items() if k not in new}
    after["class_overhead_us"] = {k: v for k, v in after["class_overhead_us"].items() if k not in new}
    assert after == before
    assert "select/sort classes fitted alone" in profile_path.read_text()
