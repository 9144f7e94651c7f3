"""Every YAML of every config group composes, passes its schema and instantiates."""

from __future__ import annotations

from importlib.resources import files

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from compress_run.hardware.profile import load_profile
from compress_run.methods.base import Method
from compress_run.pipeline.data import BaseDataModule
from compress_run.pipeline.validate import validate
from tests.conftest import compose

CONF = files("compress_run.conf")
GROUPS = ("model", "dataset", "method", "hardware", "schedule", "trainer", "logger", "debug", "paths", "hydra")


def options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]
# causal-LM options: composed with a text dataset (or a causal LM); the pretrained ones pointed at an empty data dir
LANGUAGE_OPTIONS = {("model", "tiny_llama"): [], ("model", "lstm_lm"): [],
                    ("model", "smollm2_135m"): ["paths.data_dir=/nonexistent"],
                    ("model", "hf_causal_lm"): ["model.name=/nonexistent/model"],
                    ("dataset", "shakespeare"): ["model=tiny_llama"],
                    ("dataset", "text"): ["model=tiny_llama", "dataset.root=/nonexistent"],
                    ("dataset", "wikitext2"): ["model=tiny_llama", "dataset.root=/nonexistent"]}


def check_language_option(group: str, option: str, cfg, tmp_path) -> None:
    """A causal LM runs on token ids; a pretrained one that is not there is refused naming how to get it; a text
    dataset builds (its files are read once the pipeline binds the model's tokenizer)."""
    from compress_run.models.causal_lm import is_causal_lm
    from compress_run.pipeline.text_data import TextDataModule

    if group == "model" and option in ("tiny_llama", "lstm_lm"):  # built here, byte tokens
        net = instantiate(cfg.model)
        assert is_causal_lm(net) and net.eval()(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 256)
    elif group == "model":
        with pytest.raises(Exception, match="could not be loaded") as caught:
            instantiate(cfg.model)
        assert "make llm-data" in str(caught.value.__cause__ or caught.value) or option == "hf_causal_lm"
    else:
        dm = instantiate(cfg.dataset, batch_size=4, eval_batch_size=4, seed=0)
        assert isinstance(dm, TextDataModule) and dm.network_input.shape == (cfg.dataset.seq_len,)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group
    assert {"resnet20", "resnet32", "resnet56", "vgg16_bn", "resnet18", "resnet50", "mobilenet_v2", "deit_tiny",
            "deit_small"} <= set(options("model"))
    assert {"fashion_mnist", "digits", "cifar10", "cifar100", "imagenet", "synthetic"} <= set(options("dataset"))
    assert {"dense", "magnitude", "gmp", "rigl", "gap"} <= set(options("method"))
    assert {"demo", "fmnist", "cifar", "imagenet"} <= set(options("schedule"))
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"csv", "wandb", "none"} <= set(options("logger"))


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_validates_and_instantiates(group, option, tmp_path):
    language = LANGUAGE_OPTIONS.get((group, option))
    if group in ("hydra", "paths"):
        cfg, _ = compose([])  # single-option groups, composed by default
    else:
        cfg, choices = compose([f"{group}={option}", *(language or [])])
        assert choices[group] == option
    needs_cuda = group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available()
    if needs_cuda:
        OmegaConf.to_object(cfg.trainer)  # schema checks only
    else:
        validate(cfg)
    if language is not None:
        check_language_option(group, option, cfg, tmp_path)
    elif group == "model":
        net = instantiate(cfg.model)
        x = torch.zeros(2, cfg.dataset.in_channels, cfg.dataset.image_size, cfg.dataset.image_size)
        assert net.eval()(x).shape == (2, cfg.dataset.num_classes)
    elif group == "dataset":
        dm = instantiate(cfg.dataset, batch_size=4, eval_batch_size=4, seed=0)
        assert isinstance(dm, BaseDataModule)
        if option in ("digits", "synthetic", "fashion_mnist"):
            dm.setup("fit")
            x, y = next(iter(dm.train_dataloader()))
            assert x.shape[1:] == (cfg.dataset.in_channels, cfg.dataset.image_size, cfg.dataset.image_size)
    elif group == "method":
        assert isinstance(instantiate(cfg.method), Method)
    elif group == "schedule":
        opt = instantiate(cfg.schedule.optimizer)([torch.nn.Parameter(torch.zeros(2))], lr=cfg.schedule.train.lr)
        assert isinstance(opt, torch.optim.Optimizer)
    elif group == "trainer" and not needs_cuda:
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items()
                  if v is not None and k != "enable_model_summary"}
        assert isinstance(L.Trainer(**kwargs, logger=False, default_root_dir=str(tmp_path)), L.Trainer)
    elif group == "logger":
        target = cfg.logger.get("_target_")
        if target:
            kwargs = {"save_dir": str(tmp_path)}
            kwargs.update({"version": "x"} if "CSV" in target else {"name": "t"})
            logger = instantiate(cfg.logger, **kwargs)
            assert logger.save_dir == str(tmp_path)
    elif group == "debug":
        assert cfg.trainer.limit_train_batches == 3
    elif group == "hardware":
        profile = load_profile(cfg.hardware)
        assert profile.name == option and profile.peak("conv") > 0 and profile.memory_gbps > 0


def test_the_default_job_is_gap_resnet20_fashion_mnist_demo():
    _, choices = compose([])
    assert {k: choices[k] for k in ("method", "model", "dataset", "schedule")} == {
        "method": "gap", "model": "resnet20", "dataset": "fashion_mnist", "schedule": "demo"}
