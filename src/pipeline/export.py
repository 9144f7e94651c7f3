"""``evaluate.export=onnx``: the executed network (compacted, factorized, ...) as ``model.onnx``.

Exported with torch's dynamo-based ONNX exporter (batch dimension dynamic), then checked: with
onnxruntime installed the exported graph is run on a random batch and compared with the network
(max abs difference recorded); otherwise ``onnx.checker`` validates the file.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_run.core.errors import UserError

FIX = 'install the export extra (`pip install "compress-run[export]"`: onnx, onnxscript, onnxruntime) or set ' \
      "evaluate.export=null"


def check_export_available() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"evaluate.export=onnx needs the package(s) {', '.join(missing)}, which are not installed", FIX)


def export_onnx(net: nn.Module, sample_shape: tuple[int, ...], path: Path, tolerance: float = 1e-4) -> dict[str, Any]:
    check_export_available()
    net = net.cpu().eval()
    example = torch.randn(2, *sample_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(net, (example,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    program.save(str(path))
    result: dict[str, Any] = {"export/onnx": str(path), "export/onnx_bytes": path.stat().st_size}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        batch = torch.randn(3, *sample_shape)
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            expected = net(batch).numpy()
        diff = float(abs(got - expected).max())
        if diff > tolerance * max(1.0, float(abs(expected).max())):
            raise RuntimeError(f"the exported ONNX graph disagrees with the network (max abs diff {diff:.3g})")
        result.update({"export/onnx_check": "onnxruntime", "export/onnx_max_abs_diff": diff})
    else:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
        result["export/onnx_check"] = "onnx.checker"
    return result
