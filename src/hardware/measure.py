"""Measured latency on this host: warm-up, then the median of repeated timed forward passes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def median_seconds(fn: Callable[[], object], warmup: int = 3, repeats: int = 20, min_time_s: float = 0.0,
                   max_repeats: int = 200) -> float:
    """Median wall time of ``fn()``; repeats grow until ``min_time_s`` of samples (up to ``max_repeats``)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_time_s and len(samples) < max_repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.inference_mode()
def model_latency_ms(model: nn.Module, input_shape: tuple[int, ...], warmup: int = 5, repeats: int = 20) -> float:
    """Median forward latency of ``model`` (eval mode) on a random batch of ``input_shape``, in ms."""
    was_training = model.training
    model.eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    try:
        return median_seconds(lambda: model(x), warmup=warmup, repeats=repeats) * 1e3
    finally:
        model.train(was_training)


def machine_description() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "system": platform.platform()}
