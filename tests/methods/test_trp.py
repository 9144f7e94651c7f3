"""TRP: the truncation is the rank-r SVD projection in the factorization's own reshaping, the added
gradient is the nuclear-norm subgradient, training ends with every layer at (at most) its selected rank,
and the pipeline factorizes and finetunes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from compress_run.core.factorized import _matrix, nuclear_subgradient, truncated_weight
from compress_run.methods.trp import TRP, TrainedRankPruning
from compress_run.models.cifar_resnet import resnet20
from tests.conftest import run_pipeline


@pytest.mark.parametrize("form", ["channel", "spatial"])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (24, 16, 3, 5), (12, 20, 1, 3)])
def test_truncation_is_the_best_rank_r_approximation_of_the_form_matrix(form, shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[0], shape[2:], bias=False)
    matrix = _matrix(conv, form).detach().double()
    s = torch.linalg.svdvals(matrix)
    full = len(s)
    assert torch.allclose(truncated_weight(conv, full, form), conv.weight, atol=1e-5)
    for rank in (1, full // 2):
        low = truncated_weight(conv, rank, form)
        assert low.shape == conv.weight.shape
        projected = nn.Conv2d(shape[1], shape[0], shape[2:], bias=False)
        projected.weight.data.copy_(low)
        low_matrix = _matrix(projected, form).detach().double()
        assert torch.linalg.matrix_rank(low_matrix, rtol=1e-5).item() == rank  # float32 weights
        error = torch.linalg.matrix_norm(matrix - low_matrix) ** 2  # Eckart-Young: the discarded energy
        assert error.item() == pytest.approx((s[rank:] ** 2).sum().item(), rel=1e-4)


@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_subgradient_is_u_v_transpose(form):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, bias=False)
    g = nuclear_subgradient(conv, form)
    conv_g = nn.Conv2d(8, 12, 3, bias=False)
    conv_g.weight.data.copy_(g)
    w_matrix, g_matrix = _matrix(conv, form).detach().double(), _matrix(conv_g, form).detach().double()
    nuclear = torch.linalg.svdvals(w_matrix).sum()
    assert (w_matrix * g_matrix).sum().item() == pytest.approx(nuclear.item(), rel=1e-5)  # <UV^T, W> = ||W||_*
    assert torch.linalg.svdvals(g_matrix).max().item() == pytest.approx(1.0, rel=1e-5)  # spectral norm 1


class _Tiny(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


def test_training_adds_the_subgradient_and_ends_low_rank():
    torch.manual_seed(0)
    net = resnet20(10, 3, 8)
    method = TRP(target="energy", energy=0.5, period=3, nuclear_weight=1e-2)
    callback = TrainedRankPruning(method)
    layer = method.layers(net)["layer2.0.conv2"]
    layer.weight.grad = torch.zeros_like(layer.weight)
    callback.on_before_optimizer_step(None, type("M", (), {"net": net})(), None)
    assert torch.allclose(layer.weight.grad, 1e-2 * nuclear_subgradient(layer))

    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    trainer = L.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Tiny(net), torch.utils.data.DataLoader(data, batch_size=8))
    assert method.truncations == 8 // 3 + 1  # steps 3 and 6, and the end of training
    ranks = method.truncated_ranks
    assert ranks
    for name, rank in ranks.items():
        matrix = _matrix(method.layers(net)[name], "channel").detach().double()
        assert torch.linalg.matrix_rank(matrix, rtol=1e-6).item() <= rank


def test_pipeline_trains_truncates_factorizes(tmp_path):
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=trp", "method.period=2",
                            "method.target=flops", "method.flops_reduction=0.6", "evaluate.measure_latency=false"],
                           tmp_path)
    m = results["metrics"]
    assert 0.37 <= m["model/macs_effective"] / m["model/macs_dense"] <= 0.4
    assert results["method"]["truncations"] >= 2
