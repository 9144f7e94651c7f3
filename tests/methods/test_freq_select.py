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
from compress_run.methods.freq_select import HEATMAP_FILE, SELECTION_FILE, FreqSelect, TemperatureSchedule
from compress_run.models.cifar_resnet import resnet20
from compress_run.models.frequency_stem import take_frequency_input
from compress_run.models.torchvision_models import resnet18
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py: each key flipped changes the run (digits smoke, 4x4 blocks: 16 channels)
CONFIG_FLIPS = {
    "keep_channels": ("2", []), "keep_fraction": ("0.5", []), "penalty": ("target", []), "penalty_weight": ("0.0", []),
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


def test_the_defaults_are_the_authors_gate_loss_and_temperature():
    """kaix90/DCTNet: the detection code adds the mean hard gate decision to the loss with weight 1, and its
    GumbleSoftmax samples at temperature 1 whatever it is passed."""
    method = FreqSelect()
    assert (method.penalty, method.penalty_weight, method.temperature_start, method.temperature_end) == \
        ("gates", 1.0, 1.0, 1.0)
    method.input_shape = (16, 7, 7)
    gate = method.prepare(take_frequency_input(resnet20(10, 1, 28), 16)).frequency_input
    assert gate.penalty == "gates" and float(gate.loss_weight) == 1.0 and float(gate.temperature) == 1.0


def test_compress_reads_the_gates_on_their_running_statistics_and_keeps_the_likeliest_channels():
    torch.manual_seed(0)
    method = FreqSelect(keep_channels=2, calib_size=16)
    method.input_shape = (8, 3, 3)
    model = method.prepare(take_frequency_input(resnet20(4, 1, 12), 8))
    gate = model.frequency_input
    with torch.no_grad():
        gate.decide.weight.zero_()
        gate.decide.bias.copy_(torch.tensor([1.0, 0.0] * 8))
        gate.decide.bias[[7, 13]] = torch.tensor([3.0, 2.0])  # channel 3 and 6 on-logits above their off-logits
    running = gate.hidden[1].running_mean.clone()
    data = types.SimpleNamespace(train_set=torch.utils.data.TensorDataset(torch.randn(32, 8, 3, 3), torch.zeros(32)),
                                 on_after_batch_transfer=lambda batch, index: batch)
    method.compress(model.train(), data)
    assert method.selected == [3, 6] and method.probabilities[3] > method.probabilities[6] > 0.5
    assert torch.equal(gate.hidden[1].running_mean, running)  # calibration does not move the BatchNorm
    assert model.conv1.weight.shape[1] == 2


@pytest.mark.parametrize(("method", "channels"), [("dense", "[0,1,2,3,8,9,10,11]"), ("freq_select", "null")])
def test_init_ckpt_with_the_rgb_resnets_weights_starts_the_dct_resnet_as_the_authors_do(tmp_path, method, channels):
    """init_ckpt of the image network: its weights everywhere but the stem, the input convs sliced to the first
    8 input slices (8 channels <= the 16 that layer1 reads at width 0.25) or fresh (192 channels: the gate run)."""
    from compress_run.pipeline.checkpoints import unlock_output_dir
    from compress_run.pipeline.runner import Pipeline
    from tests.conftest import compose

    torch.manual_seed(0)
    image = resnet18(10, 3, 32, width_mult=0.25, stem="imagenet").state_dict()
    torch.save(image, tmp_path / "rgb.pt")
    overrides = ["dataset=synthetic", "model=resnet18", "model.width_mult=0.25", "model.stem=imagenet",
                 "debug=smoke", "logger=none", "dataset.input_domain=dct", f"dataset.dct_channels={channels}",
                 f"method={method}", f"init_ckpt={tmp_path / 'rgb.pt'}"]
    overrides += ["method.calib_size=64"] if method == "freq_select" else []
    cfg, choices = compose(overrides)
    pipeline = Pipeline(cfg, tmp_path / "run", overrides, choices)
    try:
        pipeline.setup()  # builds the network and loads init_ckpt into it
    finally:
        unlock_output_dir(tmp_path / "run")
    net = pipeline.start_net
    state = net.state_dict()
    sliced = method == "dense"
    assert torch.equal(state["layer1.0.conv1.weight"], image["layer1.0.conv1.weight"][:, :8]) == sliced
    assert all(torch.equal(state[k], v) for k, v in image.items()
               if not k.startswith(("conv1.", "bn1.", "layer1.0.conv1.")))
    assert ("frequency_input.decide.weight" in state) == (method == "freq_select")


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
