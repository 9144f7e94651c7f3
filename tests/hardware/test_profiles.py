"""Hardware profile schema: every shipped profile loads; impossible values are rejected with the key named."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from compress_run.hardware.profile import available_profiles, load_profile


def test_the_required_profiles_ship():
    assert {"host_cpu", "a100", "h100", "jetson_orin", "mobile_a78", "systolic_asic"} <= set(available_profiles())


@pytest.mark.parametrize("name", available_profiles())
def test_profile_loads_and_has_the_contract_fields(name):
    profile = load_profile(name)
    assert profile.name == name
    for cls in ("conv", "gemm", "elementwise"):
        assert profile.peak(cls) > 0
    assert profile.memory_gbps > 0 and profile.description


def test_gpu_profiles_have_sms_and_two_four_sparsity():
    for name in ("a100", "h100", "jetson_orin"):
        profile = load_profile(name)
        assert profile.sms > 0 and "nm_2_4" in profile.sparse_formats
    assert load_profile("a100").peak("gemm", "fp16") == 312e12


def test_host_profile_is_calibrated():
    host = load_profile("host_cpu")
    assert host.calibrated and host.threads and host.class_overhead_us


@pytest.mark.parametrize(("override", "key"), [
    ({"dtype": "fp4"}, "hardware.dtype"),
    ({"peak_tflops": {"fp32": {"conv": 1, "gemm": 1}}}, "hardware.peak_tflops.fp32"),
    ({"peak_tflops": {"fp32": {"conv": 1, "gemm": 1, "elementwise": 1, "tensor": 2}}}, "hardware.peak_tflops.fp32"),
    ({"memory_gbps": 0}, "hardware.memory_gbps"),
    ({"sparse_formats": {"csr": {"efficiency": 0}}}, "hardware.sparse_formats.csr.efficiency"),
    ({"sparse_formats": {"coo": {"efficiency": 0.5}}}, "hardware.sparse_formats"),
    ({"kind": "fpga"}, "hardware.kind"),
])
def test_bad_values_name_the_key(override, key):
    base = OmegaConf.to_container(OmegaConf.structured(load_profile("mobile_a78")))
    if "peak_tflops" in override:
        base["peak_tflops"] = {}
    merged = OmegaConf.merge(base, override)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_profile(merged)
