"""Every conf/experiment file: composes, validates, names its source, builds a method that applies to its
model; and runs end to end at smoke scale on synthetic data (two in the fast suite, all in the slow one)."""

from __future__ import annotations

import re
from importlib.resources import files

import pytest
import torch
from hydra.utils import instantiate

from compress_run.hardware.profile import load_profile
from compress_run.pipeline.network_input import adapt_network, network_input_of
from compress_run.pipeline.validate import validate
from tests.conftest import compose, run_pipeline

EXPERIMENTS = sorted(p.name[:-5] for p in files("compress_run.conf").joinpath("experiment").iterdir()
                     if p.name.endswith(".yaml"))
FAST = ("fmnist_gap",)  # the default method's small-scale row; every other experiment runs in the slow set
PAPER_ROWS = {"gap_resnet50_imagenet": 6, "rigl_resnet50_imagenet": 12, "chex_": 8, "haloc_": 3, "trp_": 3,
              "comcat_": 2, "rd_": 3, "lpvit_": 3, "evit_": 2,
              "freq_": 2}
# smaller method settings the tiny synthetic split needs (its train split is smaller than a paper's calibration set)
SMOKE_OVERRIDES = {("rd_", "fmnist_rd"): ["method.calib_size=16", "method.levels=5", "method.round_fraction=0.6",
                                          "model.width_mult=0.25"],
                   ("lpvit_",): ["method.calib_size=16", "method.levels=21", "model.width_mult=0.25"],
                   ("fmnist_vit_lpvit",): ["method.calib_size=16", "method.levels=21"],
                   ("freq_", "fmnist_freq_select"): ["method.calib_size=64"]}


def test_every_paper_row_has_an_experiment():
    for prefix, count in PAPER_ROWS.items():
        assert len([e for e in EXPERIMENTS if e.startswith(prefix)]) == count, prefix
    table = {"fmnist_dense", "fmnist_magnitude", "fmnist_gmp", "fmnist_rigl", "fmnist_mest", "fmnist_gap",
             "fmnist_chex", "fmnist_l1_filter", "fmnist_svd", "fmnist_trp", "fmnist_elrt", "fmnist_haloc",
             "fmnist_haloc_macs"}
    assert table <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_names_its_source(name):
    text = files("compress_run.conf").joinpath("experiment", f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    if not name.startswith(("fmnist_", "digits_")):  # small-scale runs here reproduce no paper row
        assert re.search(r"# Reproduces: [^\n]*\(\w[^)]*\d{4}[^)]*\)[^\n]*, row", text)  # cites the paper
        assert re.search(r"top-1 \d+\.\d+%|[+-]\d+\.\d+% top-1", text)  # absolute, or a published change
    # fmnist_/digits_ are already small (their pattern rows need their own width); HALOC's reachable latency
    # target depends on the channel counts, so its rows are checked at their real width
    full_width = name.startswith(("fmnist_", "digits_", "haloc_"))
    cfg, choices = compose([f"experiment={name}"] + ([] if full_width else ["model.width_mult=0.25"]))  # less time
    validate(cfg)
    assert cfg.task_name == name
    method = instantiate(cfg.method)
    network_input = network_input_of(cfg.dataset)
    method.input_shape, method.network_input = network_input.shape, network_input  # as the pipeline
    method.hardware = load_profile(cfg.hardware)
    net = adapt_network(instantiate(cfg.model), network_input, name)
    method.check_applicable(net)
    with torch.no_grad():
        size = cfg.dataset.image_size if cfg.model._target_.endswith(".vit") else 32  # ViTs fix their input size
        x = torch.zeros(1, network_input.shape[0], *([size, size] if network_input.domain == "spatial"
                                                      else network_input.shape[1:]))
        assert net.eval()(x).shape[1] == cfg.dataset.num_classes


def _smoke(name, tmp_path):
    extra = [o for prefix, overrides in SMOKE_OVERRIDES.items() if name.startswith(prefix) for o in overrides]
    results = run_pipeline([f"experiment={name}", "debug=smoke", "dataset=synthetic", "logger=none",
                            "evaluate.repeats=2", "evaluate.warmup=1", *extra], tmp_path)
    assert results["status"] == "ok"
    assert results["choices"]["dataset"] == "synthetic"
    stages = results["stages"]
    assert stages["evaluate"]["status"] == "done"
    assert all(r["status"] == "done" or r.get("reason") for r in stages.values())  # skipped stages say why
    metrics, method = results["metrics"], results["config"]["method"]
    assert metrics["model/macs_effective"] <= metrics["model/macs_dense"]
    if ("distribution" in method or method.get("budget") == "weights") and method.get("sparsity"):
        # weight-mask methods land on their target
        assert abs(metrics["model/prunable_sparsity"] - method["sparsity"]) < 0.02


@pytest.mark.parametrize("name", FAST)
def test_experiment_runs_at_smoke_scale(name, tmp_path):
    _smoke(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e not in FAST])
def test_every_other_experiment_runs_at_smoke_scale(name, tmp_path):
    _smoke(name, tmp_path)
