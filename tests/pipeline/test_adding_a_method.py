"""docs/adding_a_method.md holds: a method is its module, its YAML and its test. A toy method written as those
files only (module into src/methods/, YAML into conf/method/) composes, validates its own key, runs and reports."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_pipeline

TOY_METHOD = "toy_added"  # other tests that list conf/method skip it: it exists only while this test runs

MODULE = '''"""Toy method for tests/pipeline/test_adding_a_method.py (one-shot pruning of |w| / temperature).

Config keys: ``temperature`` (1.0), and those of ``magnitude``.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress_run.core.config import check
from compress_run.core.masks import prune_by_score
from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, method_config


@method_config("toy_added")
@dataclass
class ToyConfig(MaskPruningConfig):
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.temperature > 0, "method.temperature", self.temperature, "a float > 0")


class Toy(MaskPruningMethod):
    Config = ToyConfig

    def compress(self, model, datamodule):
        layers = self.layers(model)
        scores = {n: m.weight.detach().abs() / self.temperature for n, m in layers.items()}
        self.achieved = prune_by_score(layers, scores, self.sparsity, self.distribution, self.pattern)
        return model
'''
YAML = """# Toy method (tests only).
defaults:
  - base_method_toy_added
  - _self_

_target_: compress_run.methods.toy_added.Toy
"""


def test_a_method_is_its_module_its_yaml_and_its_test(tmp_path):
    from compress_run.core.errors import UserError
    from compress_run.pipeline.schema import register_schemas

    module, yaml = REPO / "src" / "methods" / "toy_added.py", REPO / "conf" / "method" / "toy_added.yaml"
    for path, text in ((yaml, YAML), (module, MODULE)):  # whole files only: other tests list these folders
        partial = path.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(path)
    try:
        register_schemas()  # what the CLI does at start: the new module registers its schema
        results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=toy_added",
                                "method.sparsity=0.6", "evaluate.measure_latency=false"], tmp_path / "run")
        assert abs(results["metrics"]["model/prunable_sparsity"] - 0.6) < 0.01
        assert results["config"]["method"]["temperature"] == 1.0  # the default comes from the config class
        with pytest.raises(UserError, match="method.temperature=-1.0 is not allowed"):
            run_pipeline(["dataset=digits", "debug=smoke", "method=toy_added", "method.temperature=-1"],
                         tmp_path / "bad")
    finally:
        module.unlink()  # first the module: a run listing the methods meanwhile skips what vanished (schema.py)
        yaml.unlink()
