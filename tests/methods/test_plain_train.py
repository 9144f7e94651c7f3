"""``Method.plain_train`` declarations: a method that says its train stage is ordinary training (so a run may
take that stage over from a run of another such method) has no train-stage callback and no ``prepare``."""

from __future__ import annotations

import pytest

from compress_run.pipeline.runner import build
from tests.conftest import REPO, compose

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHODS)
def test_a_plainly_training_method_adds_nothing_to_the_train_stage(name):
    model = "vit_fmnist" if name == "lpvit" else "resnet20"
    cfg, _ = compose(["dataset=digits", f"model={model}", f"method={name}"])
    method, net = build(cfg.method, "method"), build(cfg.model, "model")
    if method.trains_plainly():
        assert method.training_callbacks("train", net) == []
        assert method.prepare(net) is net and method.lr_cycles("train") == 1


def test_plain_and_acting_methods_are_told_apart():
    plain = {}
    for name in ("magnitude", "svd", "lpvit", "gmp", "rigl", "trp", "gap"):
        cfg, _ = compose(["dataset=digits", f"method={name}"])
        plain[name] = build(cfg.method, "method").trains_plainly()
    assert plain == {"magnitude": True, "svd": True, "lpvit": True, "gmp": False, "rigl": False, "trp": False,
                     "gap": False}
