"""Accuracy under noise: the vote rules, the variance voting removes, the sweep's rows, files and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from compress_run.core.analog_noise import NoiseSpec, noisy
from compress_run.pipeline.noise_eval import draw_seed, noise_sweep, vote
from tests.conftest import run_pipeline


def test_majority_vote_counts_argmaxes_and_breaks_ties_by_mean_softmax():
    # three passes, two samples, three classes
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                           [[5.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                           [[0.0, 12.0, 0.0], [3.0, 0.0, 0.0]]])
    assert vote(logits, "majority").tolist() == [0, 0]  # sample 1: a three-way tie, class 0's mean softmax is highest
    assert vote(logits[:2], "majority").tolist() == [0, 1]  # a tie of 1 and 2: class 1 (softmax 0.50 vs 0.34)
    assert vote(logits, "mean_logit").tolist() == [1, 0]  # mean logits (3.33, 4, 0) and (1, .67, .33)


def test_averaging_k_noisy_passes_divides_the_logit_noise_variance_by_k():
    torch.manual_seed(0)
    layer = nn.Linear(32, 10)
    x = torch.randn(1, 32).expand(400, 32)
    clean = layer(x[:1])
    with noisy(layer, NoiseSpec(snr_db=0.0), torch.Generator().manual_seed(3)):
        one = torch.stack([layer(x) for _ in range(1)]).mean(0) - clean
        sixteen = torch.stack([layer(x) for _ in range(16)]).mean(0) - clean
    assert one.var().item() / sixteen.var().item() == pytest.approx(16, rel=0.15)
    stacked = torch.stack([clean + one, clean + sixteen])
    assert torch.equal(vote(stacked, "mean_logit"), (clean + (one + sixteen) / 2).argmax(1))


def _separable(n: int = 600, classes: int = 4) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    centers = torch.randn(classes, 16) * 3
    y = torch.randint(0, classes, (n,))
    x = centers[y] + 0.3 * torch.randn(n, 16)
    net = nn.Linear(16, classes)
    with torch.no_grad():  # a nearest-centre classifier
        net.weight.copy_(centers)
        net.bias.copy_(-0.5 * centers.pow(2).sum(1))
    return net, [(x[i:i + 100], y[i:i + 100]) for i in range(0, n, 100)]


def test_sweep_rows_repeat_and_voting_recovers_accuracy_that_noise_takes():
    net, batches = _separable()
    clean = sum((net(x).argmax(1) == y).sum().item() for x, y in batches) / 600
    def sweep(snrs: list[float]) -> list[dict]:
        return noise_sweep(net, lambda: iter(batches), NoiseSpec(), snrs, [1, 15], "majority",
                           seed=lambda snr: draw_seed(0, 0, snr), log=lambda _: None)

    rows = sweep([math.inf, 0.0, -6.0])
    assert rows == sweep([math.inf, 0.0, -6.0])
    assert sweep([-6.0]) == rows[4:]  # an SNR's draws do not depend on the others in the sweep
    by = {(r["snr_db"], r["votes"]): r for r in rows}
    assert by[(math.inf, 1)]["top1"] == by[(math.inf, 15)]["top1"] == pytest.approx(clean)
    assert by[(math.inf, 1)]["passes_run"] == 1  # no random noise: one pass stands for every K
    assert by[(-6.0, 1)]["top1"] < clean - 0.1  # noise costs accuracy ...
    assert by[(-6.0, 15)]["top1"] > by[(-6.0, 1)]["top1"] + 0.1  # ... that 15 votes win back
    assert by[(-6.0, 1)]["pass_top1_std"] > 0
    assert net.training and not net._forward_hooks  # its mode restored, the hooks gone


def test_a_run_writes_the_curve_and_a_new_sweep_re_runs_only_evaluate(tmp_path):
    base = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false",
            "method=noise_injection", "method.snr_db=10"]
    results = run_pipeline([*base, "evaluate.noise_snr_db=[inf,10,0]", "evaluate.noise_votes=[1,3]"], tmp_path)
    m = results["metrics"]
    assert {f"noise/top1/snr{s}/k{k}" for s in ("inf", "10", "0") for k in (1, 3)} <= set(m)
    assert (tmp_path / "noise_curve.png").stat().st_size > 1000
    assert (tmp_path / "noise_curve.csv").read_text().count("\n") == 7
    by = {(r["snr_db"], r["votes"]): r["top1"] for r in results["noise"]["curve"]}
    assert by[(math.inf, 1)] == pytest.approx(m["test/acc"])  # the batches test/acc counts (smoke: a few)
    assert results["noise"]["model"]["from"] == "the method's training noise"
    assert len(results["noise"]["curve"]) == 6 and results["noise"]["model"]["site"] == "output"
    train_record = json.loads((tmp_path / "stages/train.json").read_text())
    again = run_pipeline([*base, "evaluate.noise_snr_db=[5]", "noise=analog", "noise.weight_noise=0.05"], tmp_path)
    assert json.loads((tmp_path / "stages/train.json").read_text()) == train_record  # training kept
    assert set(k for k in again["metrics"] if k.startswith("noise/top1/")) == {"noise/top1/snr5/k1"}
    assert again["noise"]["model"]["weight_noise"] == 0.05 and again["noise"]["model"]["from"] == "noise group"


def test_votes_for_a_language_model_and_idle_or_double_training_noise_are_refused():
    from omegaconf import OmegaConf

    from compress_run.core.errors import UserError
    from compress_run.pipeline.noise_eval import RunNoise
    from compress_run.pipeline.schema import NoiseConfig

    cfg = OmegaConf.create({"seed": 0, "noise": None, "evaluate": {"noise_snr_db": [0.0], "noise_votes": [1, 5]}})
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UserError, match="scored by its perplexity under one noisy pass"):
        RunNoise(cfg, None, causal_lm=True).check(net, None, {"train"})
    noise = OmegaConf.structured(NoiseConfig(snr_db=0.0, train_stages=["finetune"]))
    cfg = OmegaConf.create({"seed": 0, "noise": noise, "evaluate": {"noise_snr_db": None}})
    with pytest.raises(UserError, match=r"names \['finetune'\], which does not train"):
        RunNoise(cfg, None, causal_lm=False).check(net, "analog", {"train"})
    cfg.noise.train_stages = ["train"]
    with pytest.raises(UserError, match="second noise on the same products"):
        RunNoise(cfg, NoiseSpec(snr_db=0.0), causal_lm=False).check(net, "analog", {"train"})
    RunNoise(cfg, None, causal_lm=False).check(net, "analog", {"train"})  # once is fine


def test_training_noise_settings_guard_the_run_dir_and_evaluation_keys_do_not(tmp_path):
    from compress_run.core.errors import UserError

    base = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false", "method=dense",
            "noise=analog", "noise.train_stages=[train]", "noise.train_snr_db=10"]
    run_pipeline(base, tmp_path)
    trained = (tmp_path / "checkpoints/train.ckpt").read_bytes()
    again = run_pipeline([*base, "noise.seed=3", "noise.snr_db=5"], tmp_path)  # evaluation keys: evaluate again
    assert (tmp_path / "checkpoints/train.ckpt").read_bytes() == trained
    assert "noise/top1/snr5/k1" in again["metrics"]
    with pytest.raises(UserError, match="different settings.*noise.snr_db: 10.0 -> 5"):
        run_pipeline([*base[:-1], "noise.train_snr_db=5"], tmp_path)


def test_a_run_recorded_before_the_noise_keys_keeps_its_evaluate_fingerprint():
    """A finished run made before evaluate.noise_* existed (its config lacks them) is not evaluated again."""
    from omegaconf import OmegaConf

    from compress_run.pipeline.validate import evaluate_fingerprint
    from tests.conftest import compose

    cfg, _ = compose(["dataset=digits"])
    old = OmegaConf.to_container(cfg, resolve=True)
    for key in ("noise_snr_db", "noise_votes", "noise_vote"):
        old["evaluate"].pop(key)
    old.pop("noise")
    assert evaluate_fingerprint(OmegaConf.create(old)) == evaluate_fingerprint(cfg)
    cfg.evaluate.noise_snr_db = [0.0]
    assert evaluate_fingerprint(cfg) != evaluate_fingerprint(OmegaConf.create(old))
