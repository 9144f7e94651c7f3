"""Every conf/experiment file: composes, validates, names its source and its published value (or why it has
none), builds a method that applies to its model; and runs end to end at smoke scale on synthetic data (two in
the fast suite, all in the slow one). The paper rows whose recipe the authors' code fixes are pinned here."""

from __future__ import annotations

import re
from importlib.resources import files
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from compress_run.hardware.profile import load_profile
from compress_run.pipeline.network_input import adapt_network, network_input_of
from compress_run.pipeline.runner import Pipeline
from compress_run.pipeline.tables import load_table, table_names
from compress_run.pipeline.validate import validate
from tests.conftest import compose, run_pipeline, write_text_corpus

EXPERIMENTS = sorted(p.name[:-5] for p in files("compress_run.conf").joinpath("experiment").iterdir()
                     if p.name.endswith(".yaml"))
FAST = ("fmnist_gap",)  # the default method's small-scale row; every other experiment runs in the slow set
PAPER_ROWS = {"gap_resnet50_imagenet": 6, "rigl_resnet50_imagenet": 12, "chex_": 8, "haloc_": 3, "trp_": 3,
              "comcat_": 2, "rd_": 3, "lpvit_": 3, "evit_": 2, "spvit_": 2,
              "freq_": 2, "llama3_": 10}
# smaller method settings the tiny synthetic split needs (its train split is smaller than a paper's calibration set)
SMOKE_OVERRIDES = {("rd_", "fmnist_rd"): ["method.calib_size=16", "method.levels=5", "method.round_fraction=0.6",
                                          "model.width_mult=0.25"],
                   ("lpvit_",): ["method.calib_size=16", "method.levels=21", "model.width_mult=0.25"],
                   ("fmnist_vit_lpvit",): ["method.calib_size=16", "method.levels=21"],
                   ("freq_", "fmnist_freq_select"): ["method.calib_size=64"],
                   # schedule=deit's per-image transforms need ImageFolder data, not the synthetic tensors
                   ("evit_", "lpvit_", "comcat_", "spvit_"): ["schedule.augment.rand_augment=null",
                                                              "schedule.augment.random_erasing=0"]}
# a published value: absolute, or a published change
PUBLISHED = re.compile(r"top-1 \d+\.\d+%|[+-]\d+\.\d+% top-1|perplexity \d+\.\d+")
# a row without one says so, and why (the rest of the line at least, more lines may follow)
NO_PUBLISHED = re.compile(r"^# Published: null; reason: \S.{30,}$", re.MULTILINE)


def published_or_reason(text: str) -> str:
    """'value' or 'reason': a paper row names its published value, or states `Published: null; reason: ...`,
    never both and never neither."""
    value, reason = PUBLISHED.search(text), NO_PUBLISHED.search(text)
    assert bool(value) != bool(reason), ("both a published value and 'Published: null'" if value else
                                         "neither a published value nor 'Published: null; reason: ...'")
    return "value" if value else "reason"


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
    if name.startswith((*LANGUAGE_RUNS, "llama3_")):
        if name.startswith("llama3_"):  # paper rows for GPU users: a pretrained LLaMA-3 that is not here
            assert re.search(r"# Reproduces: [^\n]*\(\w[^)]*\d{4}[^)]*\)[^\n]*, row", text)
            published_or_reason(text)
        check_language_experiment(name)
        return
    if not name.startswith(("fmnist_", "digits_")):  # small-scale runs here reproduce no paper row
        assert re.search(r"# Reproduces: [^\n]*\(\w[^)]*\d{4}[^)]*\)[^\n]*, row", text)  # cites the paper
        published_or_reason(text)
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
    method.distill_config = OmegaConf.to_container(cfg.distill, resolve=True)
    net = adapt_network(instantiate(cfg.model), network_input, name)
    method.check_applicable(net)
    with torch.no_grad():
        fixed = cfg.model._target_.rsplit(".", 1)[-1] in ("vit", "mlp", "recurrent")  # they fix their input size
        size = cfg.dataset.image_size if fixed else 32
        x = torch.zeros(1, network_input.shape[0], *([size, size] if network_input.domain == "spatial"
                                                      else network_input.shape[1:]))
        assert net.eval()(x).shape[1] == cfg.dataset.num_classes


LANGUAGE_RUNS = ("smollm2_", "tiny_llama_")  # small-scale causal-LM runs: they reproduce no paper row


def check_language_experiment(name: str) -> None:
    """A causal-LM experiment composes with its text dataset and a method that acts on causal LMs; a model built
    here runs on token ids."""
    from compress_run.models.causal_lm import is_causal_lm

    cfg, _ = compose([f"experiment={name}"])
    validate(cfg)
    assert cfg.task_name == name and "seq_len" in cfg.dataset
    assert "causal_lm" in type(instantiate(cfg.method)).tasks
    if name.startswith("tiny_llama_"):
        net = instantiate(cfg.model)
        assert is_causal_lm(net) and net.eval()(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 256)


def test_a_paper_row_may_lack_its_published_value_only_with_the_reason():
    header = "# Reproduces: X (A et al., ECCV 2022), row {model: m}\n"
    assert published_or_reason(header + "# Published: top-1 79.9% at 50% of the MACs\n") == "value"
    assert published_or_reason(header + "# Published: null; reason: the paper's table was not readable here\n") \
        == "reason"
    for bad in ("# Published: null\n", "# Published: null; reason:\n", "# Published: soon\n",
                "# Published: top-1 79.9%\n# Published: null; reason: the paper's table was not readable here\n"):
        with pytest.raises(AssertionError):
            published_or_reason(header + bad)
    # a table row without its headline value runs an experiment that says why
    for name in table_names():
        table = load_table(name)
        for row in table.rows:
            if row.experiment.startswith(("fmnist_", "digits_", *LANGUAGE_RUNS)) or table.metrics[0] in row.paper:
                continue
            text = files("compress_run.conf").joinpath("experiment", f"{row.experiment}.yaml").read_text()
            assert published_or_reason(text) == "reason", (name, row.name)
    assert [published_or_reason(files("compress_run.conf").joinpath("experiment", f"spvit_deit_{m}_imagenet.yaml")
                                .read_text()) for m in ("tiny", "small")] == ["reason", "reason"]


def test_rd_imagenet_row_prunes_iteratively_as_the_authors():
    cfg, _ = compose(["experiment=rd_resnet50_imagenet_s41"])
    method = instantiate(cfg.method)
    # iterate.py + modelloaders.py (resnet50): 20% of the remaining weights per round, 256 calibration images,
    # 100 + 1 levels, worst-case curves; a fresh finetune of 40,000 steps x batch 64 (2 ImageNet epochs) per round
    assert method.iterative and method.round_fraction == 0.2 and method.rounds() == 3
    assert [round(method.round_sparsity(r), 4) for r in (1, 2, 3)] == [0.2, 0.36, 0.41]
    assert (method.calib_size, method.levels, method.distortion, list(method.exclude)) == (256, 101, "worst_mse", [])
    finetune = cfg.schedule.finetune
    assert finetune.epochs == 2 * method.rounds() and finetune.warmup_epochs == 0
    assert finetune.lr_schedule == "cosine" and finetune.weight_decay == 1e-4


def test_comcat_rows_finetune_with_the_released_recipe():
    small, _ = compose(["experiment=comcat_deit_small_imagenet_p50"])
    base, _ = compose(["experiment=comcat_deit_base_imagenet_p60"])
    for cfg in (small, base):
        assert cfg.schedule.optimizer._target_ == "torch.optim.AdamW" and cfg.model.drop_path_rate == 0.1
        assert (cfg.schedule.finetune.epochs, cfg.schedule.finetune.warmup_epochs) == (300, 0)
        assert (cfg.distill.teacher, cfg.distill.kind, cfg.distill.alpha) == ("train", "hard", 0.5)
        assert dict(cfg.schedule.augment) == {"rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
                                              "mixup": 0.8, "cutmix": 1.0, "repeats": 3}
        assert cfg.method.search_epochs == 30
    # run.sh: DeiT-S lr 1e-4 per 512 images (main.py scales it by the batch), weight decay 5e-3, --with-align
    assert small.schedule.finetune.lr * 512 / small.schedule.batch_size == pytest.approx(1e-4)
    assert small.schedule.finetune.weight_decay == 5e-3 and small.method.finetune_block_weight == 0.01
    # DeiT-B: 1e-4 unscaled at its batch of 4 x 256, the default weight decay, no alignment
    assert base.schedule.finetune.lr * 1024 / base.schedule.batch_size == pytest.approx(1e-4)
    assert base.schedule.finetune.weight_decay is None and base.method.finetune_block_weight == 0


def test_a_stage_weight_decay_replaces_the_optimizers(tmp_path):
    cfg, choices = compose(["experiment=comcat_deit_small_imagenet_p50"])
    pipeline = Pipeline(cfg, tmp_path, [], choices)
    pipeline.method = instantiate(cfg.method)
    pipeline.datamodule = SimpleNamespace(network_input=SimpleNamespace(shape=(3, 32, 32)))
    net = torch.nn.Linear(2, 2)
    decays = {stage: pipeline.module(net, stage).optimizer_factory(net.parameters(), lr=1.0).defaults["weight_decay"]
              for stage in ("train", "finetune")}
    assert decays == {"train": 0.05, "finetune": 5e-3}


def _smoke(name, tmp_path):
    if name.startswith(LANGUAGE_RUNS):  # a small text corpus; SmolLM2 itself needs `make llm-data`
        corpus = write_text_corpus(tmp_path / "c")
        results = run_pipeline([f"experiment={name}", "debug=smoke", f"dataset.root={corpus}", "dataset.seq_len=32",
                                "dataset.max_eval_sequences=2", "logger=none",
                                "evaluate.repeats=2", "evaluate.warmup=1", "quant=w8a8", "quant.calib_size=4"],
                               tmp_path / "run")
        assert results["status"] == "ok" and results["metrics"]["test/kl"] >= 0
        return
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
@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e not in FAST and not e.startswith("llama3_")])
def test_every_other_experiment_runs_at_smoke_scale(name, tmp_path):
    # (the llama3_ rows need a Hugging Face model dir: tests/pipeline/test_llm_paper_rows.py smoke-runs them)
    _smoke(name, tmp_path)
