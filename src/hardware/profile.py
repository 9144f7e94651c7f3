"""Hardware profile schema (``conf/hardware/*.yaml``, ConfigStore ``base_hardware``) and loader.

A profile describes a device for the latency simulator: peak throughput per dtype and op class, memory
bandwidth (DRAM and on-chip), per-kernel overheads, the sparse formats it can execute with their
efficiency, GPU tile/wave quantization (SM count) and, for the systolic array, its geometry.

Sparse format model: executing a layer in format F at format density d (stored fraction: nonzeros for
``csr``, non-empty blocks for ``bsr_<b>``, N/M for ``nm_<n>_<m>``) takes
``fixed * dense_time + d * mac_time / efficiency (+ operand bytes / operand_gbps)``: ``efficiency`` is
the per-stored-element throughput relative to the dense kernel's peak, ``fixed`` the density-independent
part as a fraction of the dense time, and the optional operand term the format's own activation
handling (e.g. im2col before a CSR product on the host). Without the operand term, break-even density is
``(1 - fixed) * efficiency``; two published points (speedup at one sparsity, break-even sparsity)
determine both numbers, and each profile cites them. The host profile fits all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")
OP_CLASSES = ("conv", "conv_im2col", "conv_dw", "gemm", "attention", "pool", "select", "sort", "elementwise")
REQUIRED_CLASSES = ("conv", "gemm", "elementwise")
FALLBACK_CLASS = {"conv_dw": "conv", "conv_im2col": "conv", "attention": "gemm", "pool": "elementwise",
                  "select": "elementwise", "sort": "elementwise"}
KINDS = ("cpu", "gpu", "systolic")
SPARSE_FORMATS = ("csr", "bsr_4", "bsr_16", "bsr_32", "bsr_64", "nm_2_4", "gather_scatter")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {allowed}")


@dataclass
class SparseFormatConfig:
    efficiency: float = 1.0          # throughput per stored element relative to the dense kernel
    fixed: float = 0.0               # fraction of the dense time paid at any density
    index_bits: int = 32             # metadata bits per stored element (csr, nm) or per block (bsr)
    operand_gbps: float = 0.0        # activation handling of the sparse kernel (0 = none / in fixed)

    def check(self, key: str) -> None:
        _check(0 < self.efficiency <= 4, f"{key}.efficiency", self.efficiency, "a float in (0, 4]")
        _check(0 <= self.fixed < 1, f"{key}.fixed", self.fixed, "a float in [0, 1)")
        _check(self.operand_gbps >= 0, f"{key}.operand_gbps", self.operand_gbps, "a float >= 0")
        _check(self.index_bits >= 0, f"{key}.index_bits", self.index_bits, "an integer >= 0")


@dataclass
class SystolicConfig:
    rows: int = 256                  # R: array rows (reduction dim K is mapped here)
    cols: int = 256                  # C: array columns (output channels N are mapped here)
    clock_ghz: float = 0.7
    dram_words_per_cycle: float = 10.0


@dataclass
class HardwareConfig:
    name: str = ""
    description: str = ""
    kind: str = "cpu"
    dtype: str = "fp32"              # dtype the simulator runs the model in on this device
    word_bytes: dict[str, int] = field(default_factory=lambda: {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2,
                                                                "fp8": 1, "int8": 1})
    # dtype -> op class -> TFLOP/s (inner values typed Any: OmegaConf rejects ints in nested float dicts)
    peak_tflops: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_gbps: float = 0.0         # DRAM bandwidth
    onchip_mb: float = 0.0           # last-level cache / SRAM; activations smaller than half stay on chip
    onchip_gbps: float = 0.0
    kernel_overhead_us: float = 0.0  # per executed kernel (launch / dispatch)
    class_overhead_us: dict[str, float] = field(default_factory=dict)  # extra per kernel of an op class
    # per op class: rate at which the framework re-lays out a dense weight on every call (PyTorch eager
    # reorders a plain-layout conv weight into oneDNN's blocked layout each time); absent = no such cost
    weight_prep_gbps: dict[str, Any] = field(default_factory=dict)
    # per op class: rate at which a kernel packs/unfolds its activation operands (GEMM panels, im2col
    # matrices: batch * (M*K + M*N) values); absent = folded into the peak
    operand_gbps: dict[str, Any] = field(default_factory=dict)
    view_overhead_us: float = 0.0    # per alias/allocation op (eager frameworks only)
    module_overhead_us: float = 0.0  # per module forward call (eager frameworks only)
    # multiplier on every layer's time for ops run back to back inside a network instead of alone (cold
    # caches, allocator, thread wake-ups); fitted by the host calibration, 1.0 for spec-sheet profiles
    context_factor: float = 1.0
    fuse_epilogue: bool = False      # elementwise ops consuming a kernel's output run inside that kernel
    sms: int = 0                     # streaming multiprocessors (GPU wave quantization); 0 = none
    tile: list[int] = field(default_factory=lambda: [128, 128])  # output tile (M, N) of one CTA
    # channel/rank step the device's kernels are built around (SIMD lanes, tensor-core K/N multiple, array
    # slice); rank searches (HALOC) try multiples of it
    rank_granularity: int = 8
    sparse_formats: dict[str, SparseFormatConfig] = field(default_factory=dict)
    systolic: SystolicConfig | None = None
    # the link between two devices of this kind running one network split across them (DISCO's within-layer
    # parallelism): gigabits per second in each direction, and the latency of one transfer; 0: no link described
    link_gbps: float = 0.0
    link_latency_us: float = 0.0
    threads: int | None = None       # CPU threads the figures were measured with
    calibrated: str | None = None    # date and machine of the calibration that produced the numbers

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, "hardware.kind", self.kind, ", ".join(KINDS))
        _check(self.dtype in DTYPES, "hardware.dtype", self.dtype, ", ".join(DTYPES))
        for dtype, classes in self.peak_tflops.items():
            _check(dtype in DTYPES, "hardware.peak_tflops", dtype, ", ".join(DTYPES))
            for cls, value in classes.items():
                _check(cls in OP_CLASSES, f"hardware.peak_tflops.{dtype}", cls, ", ".join(OP_CLASSES))
                _check(isinstance(value, int | float) and value > 0, f"hardware.peak_tflops.{dtype}.{cls}", value,
                       "a number > 0")
                classes[cls] = float(value)
            missing = [c for c in REQUIRED_CLASSES if c not in classes]
            _check(not missing, f"hardware.peak_tflops.{dtype}", sorted(classes),
                   f"entries for every one of {list(REQUIRED_CLASSES)} (missing {missing})")
        _check(self.dtype in self.peak_tflops, "hardware.dtype", self.dtype,
               f"a dtype with peak_tflops entries: {sorted(self.peak_tflops)}")
        _check(0.25 <= self.context_factor <= 4, "hardware.context_factor", self.context_factor, "a float in [0.25, 4]")
        _check(self.memory_gbps > 0, "hardware.memory_gbps", self.memory_gbps, "a float > 0")
        _check(self.onchip_mb >= 0 and self.onchip_gbps >= 0, "hardware.onchip_mb/onchip_gbps",
               (self.onchip_mb, self.onchip_gbps), "floats >= 0")
        for key in ("kernel_overhead_us", "view_overhead_us", "module_overhead_us", "link_gbps", "link_latency_us"):
            _check(getattr(self, key) >= 0, f"hardware.{key}", getattr(self, key), "a float >= 0")
        for key in ("class_overhead_us", "weight_prep_gbps", "operand_gbps"):
            for cls, value in getattr(self, key).items():
                _check(cls in OP_CLASSES, f"hardware.{key}", cls, ", ".join(OP_CLASSES))
                _check(isinstance(value, int | float) and value >= 0, f"hardware.{key}.{cls}", value,
                       "a number >= 0")
        for fmt, spec in self.sparse_formats.items():
            _check(fmt in SPARSE_FORMATS, "hardware.sparse_formats", fmt, ", ".join(SPARSE_FORMATS))
            spec.check(f"hardware.sparse_formats.{fmt}")
        _check(self.rank_granularity >= 1, "hardware.rank_granularity", self.rank_granularity, "an integer >= 1")
        _check(len(self.tile) == 2 and min(self.tile) > 0, "hardware.tile", self.tile, "[M, N] positive")
        _check(self.kind != "systolic" or self.systolic is not None, "hardware.systolic", self.systolic,
               "a systolic block (rows, cols, clock_ghz, dram_words_per_cycle) for kind=systolic")

    def peak(self, op_class: str, dtype: str | None = None) -> float:
        """FLOP/s of ``op_class`` in ``dtype`` (a class without an entry uses its FALLBACK_CLASS)."""
        classes = self.peak_tflops[dtype or self.dtype]
        cls = op_class if op_class in classes else FALLBACK_CLASS.get(op_class, "gemm")
        return classes[cls] * 1e12

    def bytes_per_element(self, dtype: str | None = None) -> int:
        return self.word_bytes.get(dtype or self.dtype, 4)


def available_profiles() -> list[str]:
    folder = resources.files("compress_run.conf") / "hardware"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_cfg: Any) -> HardwareConfig:
    """A profile by name (``conf/hardware/<name>.yaml``) or from a config node, validated."""
    if isinstance(name_or_cfg, HardwareConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in available_profiles():
            raise KeyError(f"unknown hardware profile {name_or_cfg!r}; available: {', '.join(available_profiles())}")
        path = resources.files("compress_run.conf") / "hardware" / f"{name_or_cfg}.yaml"
        node = OmegaConf.create(path.read_text())
        node.pop("defaults", None)
    else:
        node = OmegaConf.create(OmegaConf.to_container(name_or_cfg, resolve=True))
        node.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.structured(HardwareConfig), node)
    return OmegaConf.to_object(merged)
