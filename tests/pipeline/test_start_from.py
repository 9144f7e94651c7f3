"""``start_from``: a run takes over the finished stages of another run that it would repeat — all stages
before quantize when only ``quant`` differs (tested with the quantized table rows), or the train stage alone
when the two runs' train inputs are equal, e.g. two pruning methods that both train plainly."""

from __future__ import annotations

import json

import pytest

from compress_run.core.errors import UserError
from tests.conftest import run_pipeline

FAST = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false"]


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("magnitude")
    run_pipeline([*FAST, "method=magnitude", "method.sparsity=0.5"], out)
    return out


def _stage(run, stage):
    return json.loads((run / "stages" / f"{stage}.json").read_text())


def test_a_plainly_training_method_takes_over_another_methods_train_stage(magnitude_run, tmp_path):
    out = tmp_path / "svd"
    results = run_pipeline([*FAST, "method=svd", f"start_from={magnitude_run}"], out)
    train, source = _stage(out, "train"), _stage(magnitude_run, "train")
    assert train["taken_from"] == str(magnitude_run)
    assert train["train_inputs"] == source["train_inputs"] and train["wall_s"] == source["wall_s"]
    checkpoint = "checkpoints/train.ckpt"
    assert (out / checkpoint).read_bytes() == (magnitude_run / checkpoint).read_bytes()
    for stage in ("compress", "finetune", "evaluate"):  # the method's own stages ran
        assert _stage(out, stage)["status"] == "done" and "taken_from" not in _stage(out, stage)
    assert results["method"]["ranks"] and results["metrics"]["model/params_reduction"] > 0.3  # SVD factorized it


@pytest.mark.parametrize(("overrides", "named"), [
    (["method=gmp"],  # GMP prunes while it trains
     "method: plain training (no method hook in the train stage) -> GMP, which acts in the train stage"),
    (["method=svd", "schedule.train.lr=0.05"], "schedule.train.lr"),
    (["method=svd", "seed=1"], "seed: 0 -> 1"),
])
def test_a_run_whose_train_inputs_differ_is_refused(magnitude_run, tmp_path, overrides, named):
    out = tmp_path / "other"
    with pytest.raises(UserError) as caught:
        run_pipeline([*FAST, *overrides, f"start_from={magnitude_run}"], out)
    text = str(caught.value)
    assert "its train stage cannot be taken over either" in text and named in text, text
    assert not any(out.rglob("*.ckpt"))
