"""freq_select: gates train with the network, the compress stage keeps the most used channels and narrows the
network to them, the run reports the selection (JSON, heat map) and the input it now reads, and another method
trains on that selection with one setting."""

from __future__ import annotations

import json
import types

import pytest
import torch

from compress_run.core.errors import UserError
from compress_run.core.frequency_input import FrequencyGate
from compress_run.methods.freq_select import HEATMAP_FILE, SELECTION_FILE, TemperatureSchedule
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py: each key flipped changes the run (digits smoke, 4x4 blocks: 16 channels)
CONFIG_FLIPS = {
    "keep_channels": ("2", []), "keep_fraction": ("0.5", []), "penalty_weight": ("0.0", []),
    "temperature_start": ("5.0", []), "temperature_end": ("0.1", []), "calib_size": ("32", []),
}
DCT = ["dataset=digits", "debug=smoke", "logger=none", "dataset.input_domain=dct", "dataset.dct_block=4"]


@pytest.mark.slow  # two pipeline runs (CI runs it in its slow set)
def test_the_run_keeps_the_most_used_channels_and_reads_only_them(tmp_path):
    results = run_pipeline([*DCT, "method=freq_select", "method.calib_size=64"], tmp_path / "select")
    selection = json.loads((tmp_path / "select" / SELECTION_FILE).read_text())
    probabilities = selection["probabilities"]
    assert len(probabilities) == 16 and len(selection["channels"]) == 4  # keep_fraction 0.25 of 16
    threshold = sorted(probabilities, reverse=True)[3]
    assert all(probabilities[c] >= threshold for c in selection["channels"])
    assert (tmp_path / "select" / HEATMAP_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = results["metrics"]
    assert m["input/values"] == 4 * 2 * 2 and m["input/bytes"] == 32  # 4 channels on the 2x2 grid, int16
    assert selection["input_all"]["input/values"] == 64
    state = torch.load(tmp_path / "select" / "checkpoints" / "finetune.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert state["net.conv1.weight"].shape[1] == 4
    assert state["net.frequency_input.channels"].tolist() == selection["channels"]

    # the selection as data: another method trains a network that reads those channels alone
    reused = run_pipeline([*DCT, "method=magnitude", "method.sparsity=0.5",
                           f"dataset.dct_channels={tmp_path / 'select'}"], tmp_path / "reuse")
    assert reused["metrics"]["input/values"] == 16
    state = torch.load(tmp_path / "reuse" / "checkpoints" / "finetune.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert state["net.conv1.weight"].shape[1] == 4 and not any("frequency_input" in k for k in state)


def test_the_gumbel_temperature_falls_geometrically_over_the_train_stage():
    gate = FrequencyGate(4, 0.5, 1.0, 2.0)
    schedule = TemperatureSchedule(gate, 2.0, 0.5)
    temperatures = []
    for epoch in range(3):
        schedule.on_train_epoch_start(types.SimpleNamespace(current_epoch=epoch, max_epochs=3), None)
        temperatures.append(float(gate.temperature))
    assert temperatures == pytest.approx([2.0, 1.0, 0.5])


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset=digits"], "set dataset.input_domain=dct"),
    ([*DCT, "dataset.dct_channels=[0,1]"], "already narrows the input"),
    ([*DCT, "method.keep_channels=17"], "more than the 16 frequency channels"),
])
def test_settings_the_method_cannot_honour_are_refused(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_pipeline([*overrides, "debug=smoke", "logger=none", "method=freq_select", "method.calib_size=64"],
                     tmp_path)
