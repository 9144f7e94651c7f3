"""The network as it would ship: exported to ONNX and run by ONNX Runtime on the host's CPU.

``evaluate.deploy_latency`` (on by default when host latency is measured) exports the evaluated network (the
executed form: compacted, factorized, masked weights as stored) with torch's dynamo-based exporter, checks the
graph against the network on a random batch and times it at batch 1 and batch N with as many intra-op threads as
torch uses, next to the eager PyTorch measurement of the same run. Eager PyTorch on these small networks is bound
by per-op framework overhead; the runtime fuses batch norm into convolutions and runs the graph without Python
between ops, which is what a deployment would see. Masked weights run dense here (the runtime has no sparse
kernels for them); a quantized network is measured in its int8 form by ``int8_host`` instead.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress_run.core.quantization import inputs_unrounded
from compress_run.hardware.measure import median_seconds

RUNTIME_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
AGREEMENT_TOLERANCE = 1e-4  # max abs difference of the graph's logits from the network's, relative to their peak
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*m")
QUALIFIED_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


def missing_runtime_packages() -> list[str]:
    return [m for m in RUNTIME_PACKAGES if importlib.util.find_spec(m) is None]


def export_float(net: nn.Module, sample_shape: tuple[int, ...], path: Path) -> None:
    """``net`` as an ONNX graph with a dynamic batch dimension (a quantized network's inputs left unrounded)."""
    with warnings.catch_warnings(), inputs_unrounded():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(net, (torch.randn(2, *sample_shape),), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    program.save(str(path))


def export_failure(exc: Exception) -> str:
    """Why the export failed, in one line: torch.onnx's errors open with generic next steps (in terminal colours)
    and name the cause under "## Exception summary"; that first line is the reason kept."""
    text = TERMINAL_CODES.sub("", str(exc))
    before, found, summary = text.partition("## Exception summary")
    if found:
        text = QUALIFIED_CLASS.sub(r"\1", next((line for line in summary.splitlines() if line.strip()), before))
    return f"ONNX export failed: {type(exc).__name__}: {' '.join(text.split())[:200]}"


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(sess: Any, shape: tuple[int, ...], warmup: int, repeats: int) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).numpy()
    name = sess.get_inputs()[0].name
    return median_seconds(lambda: sess.run(None, {name: x}), warmup=warmup, repeats=repeats) * 1e3


def deployed_latency_metrics(net: nn.Module, sample_shape: tuple[int, ...], batch: int, warmup: int = 5,
                             repeats: int = 20) -> dict[str, Any]:
    """``latency_deploy_ms/b1`` and ``/b<batch>`` of ``net`` run by ONNX Runtime, or ``latency_deploy/skipped``
    with the reason it could not be measured (packages missing, export failed, graph disagrees)."""
    missing = missing_runtime_packages()
    if missing:
        return {"latency_deploy/skipped": f"{', '.join(missing)} not installed (pip install \"compress-run[export]\")"}
    import onnxruntime

    net = net.cpu().eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export_float(net, sample_shape, path)
        except Exception as exc:  # an op the exporter cannot write: say so instead of timing something else
            return {"latency_deploy/skipped": export_failure(exc)}
        sess = session(path, threads)
        check = torch.randn(3, *sample_shape, generator=torch.Generator().manual_seed(1))
        got = sess.run(None, {sess.get_inputs()[0].name: check.numpy()})[0]
        with torch.no_grad():
            expected = net(check).numpy()
        diff = float(np.abs(got - expected).max())
        if diff > AGREEMENT_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            return {"latency_deploy/skipped": f"the exported graph disagrees with the network (max abs diff "
                                              f"{diff:.3g})"}
        metrics: dict[str, Any] = {
            "latency_deploy/runtime": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
            "latency_deploy/threads": threads, "latency_deploy/max_abs_diff": diff}
        for b in sorted({1, batch}):
            metrics[f"latency_deploy_ms/b{b}"] = round(latency_ms(sess, (b, *sample_shape), warmup, repeats), 4)
    return metrics
