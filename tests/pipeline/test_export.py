"""evaluate.export=onnx: the compacted network is exported and the ONNX graph computes the same logits;
without the exporter packages the run is refused before anything is written."""

from __future__ import annotations

import importlib.util

import pytest

from compress_run.core.errors import UserError
from tests.conftest import run_pipeline

ARGS = ["dataset=digits", "debug=smoke", "logger=none", "method=l1_filter", "evaluate.export=onnx"]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_compacted_model_exports_to_onnx_and_matches(tmp_path):
    results = run_pipeline(ARGS, tmp_path)
    metrics = results["metrics"]
    assert (tmp_path / "model.onnx").stat().st_size == metrics["export/onnx_bytes"] > 0
    assert metrics["export/onnx_check"] == "onnxruntime"
    assert metrics["export/onnx_max_abs_diff"] < 1e-4
    assert metrics["model/params_original"] > metrics["model/params_dense"]


def test_missing_exporter_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UserError, match="onnxscript"):
        run_pipeline(ARGS, tmp_path)
    assert not (tmp_path / "results.json").exists()
