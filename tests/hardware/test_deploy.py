"""The deployed form (evaluate.deploy_latency): the network exported to ONNX and timed in ONNX Runtime, or a stated
reason it was not — never the latency of a graph that computes something else."""

from __future__ import annotations

import torch
from torch import nn

from compress_run.hardware import deploy
from compress_run.hardware.deploy import deployed_latency_metrics


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[3].weight[:, :4] = 0  # masked weights run dense in the runtime
    return net.eval()


def test_the_network_runs_in_onnx_runtime_at_both_batches_and_agrees_with_itself():
    metrics = deployed_latency_metrics(small_cnn(), (1, 8, 8), batch=4, warmup=1, repeats=3)
    assert "latency_deploy/skipped" not in metrics, metrics
    assert metrics["latency_deploy_ms/b1"] > 0 and metrics["latency_deploy_ms/b4"] > 0
    assert metrics["latency_deploy/max_abs_diff"] < 1e-4
    assert metrics["latency_deploy/threads"] == torch.get_num_threads()
    assert metrics["latency_deploy/runtime"].startswith("onnxruntime ")


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.sum()) > 0 else x  # a branch on a value: the exporter cannot write it


def test_what_cannot_be_exported_or_run_is_reported_as_not_measured(monkeypatch):
    failed = deployed_latency_metrics(DataDependent(), (4,), batch=2, warmup=1, repeats=2)
    assert set(failed) == {"latency_deploy/skipped"} and failed["latency_deploy/skipped"].startswith("ONNX export")
    assert "\x1b" not in failed["latency_deploy/skipped"] and "Next steps" not in failed["latency_deploy/skipped"]

    def wrong_export(net, sample_shape, path):  # an exporter that writes another network's graph
        other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
        deploy.torch.onnx.export(other, (torch.randn(2, *sample_shape),), dynamo=True,
                                 dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)).save(str(path))

    monkeypatch.setattr(deploy, "export_float", wrong_export)
    wrong = deployed_latency_metrics(small_cnn(), (1, 8, 8), batch=2, warmup=1, repeats=2)
    assert set(wrong) == {"latency_deploy/skipped"} and "disagrees" in wrong["latency_deploy/skipped"]
    monkeypatch.setattr(deploy.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else 1)
    missing = deployed_latency_metrics(small_cnn(), (1, 8, 8), batch=2)
    assert missing == {"latency_deploy/skipped": 'onnxruntime not installed (pip install "compress-run[export]")'}


def test_an_export_failure_is_reported_by_its_cause_without_terminal_colours():
    message = ("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m of exporting "
               "the model to ONNX. Next steps:\n- If there is a missing ONNX function, implement it.\n\n"
               "## Exception summary\n\n<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No ONNX "
               "function found for <built-in function round>.\n\u2b06\ufe0f\n<class 'x.ConversionError'>: ...")
    assert deploy.export_failure(RuntimeError(message)) == (
        "ONNX export failed: RuntimeError: DispatchError: No ONNX function found for <built-in function round>.")
    assert deploy.export_failure(ValueError("plain\nreason")) == "ONNX export failed: ValueError: plain reason"
    assert deploy.export_failure(ValueError("the cause\n## Exception summary\n\n")) == (
        "ONNX export failed: ValueError: the cause")
