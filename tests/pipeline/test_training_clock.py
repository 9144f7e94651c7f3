"""The training clock: a fit resumed from an epoch checkpoint continues the sums of the epochs before it."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress_run.pipeline.callbacks import TrainingClock


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, epochs: int, clock: TrainingClock, ckpt_path: str | None = None) -> None:
    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=16)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1,
                                                     every_n_epochs=1, save_on_train_epoch_end=True,
                                                     enable_version_counter=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[clock, checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(_Tiny(), train_dataloaders=data, ckpt_path=ckpt_path)


def test_a_resumed_fit_counts_the_epochs_before_the_resume_once(tmp_path):
    first = TrainingClock()
    _fit(tmp_path, 2, first)
    assert first.epochs == 2 and first.cpu_s > 0 and first.wall_s > 0
    resumed = TrainingClock()
    _fit(tmp_path, 5, resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.epochs == 5  # 2 restored from the checkpoint + 3 run now
    assert resumed.cpu_s > first.cpu_s and resumed.wall_s > first.wall_s


def test_table_training_time_sums_the_cpu_seconds_of_every_stage_the_run_reached():
    from compress_run.pipeline.tables import metric_spec

    _, value = metric_spec("train_cpu_s")
    run = {"time/train_s": 90.0, "time/train_cpu_s": 60.0, "time/compress_s": 3.0, "time/compress_cpu_s": 2.5,
           "time/finetune_s": 40.0, "time/finetune_cpu_s": 30.0}
    assert value(run) == 92.5
    assert value({"time/train_s": 90.0, "time/train_cpu_s": 60.0}) == 60.0  # a method without finetune
    before_the_clock = {k: v for k, v in run.items() if k != "time/finetune_cpu_s"}
    assert value(before_the_clock) is None  # a partial sum would pass for a cheaper run


def test_a_stage_resumed_after_a_crash_reports_the_time_of_every_epoch(tmp_path, monkeypatch):
    # every train epoch takes at least 1.5 s; the first process crashes as its fourth (last) epoch starts
    from compress_run.pipeline import callbacks
    from tests.conftest import run_pipeline

    seconds, crash = 1.5, {"armed": True}
    original = callbacks.EpochSeed.on_train_epoch_start

    def start(self, trainer, pl_module):
        if self.stage == "train" and trainer.current_epoch == 3 and crash.pop("armed", False):
            raise RuntimeError("simulated crash")
        original(self, trainer, pl_module)

    monkeypatch.setattr(callbacks.EpochSeed, "on_train_epoch_start", start)
    monkeypatch.setattr(callbacks.EpochSeed, "on_train_epoch_end", lambda *_: time.sleep(seconds), raising=False)
    overrides = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false",
                 "schedule.train.epochs=4", "stages=[train]"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(overrides, tmp_path)
    results = run_pipeline(overrides, tmp_path)
    assert results["metrics"]["time/train_s"] >= 4 * seconds  # the resumed process ran one epoch of the four
    assert results["metrics"]["time/train_cpu_s"] < results["metrics"]["time/train_s"]
