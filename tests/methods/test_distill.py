"""The shared distillation path: the DeiT-form loss (soft and hard), and any method's finetune stage distilling
from a teacher checkpoint (here the run's own train stage) while its train stage does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress_run.methods.distill import distillation_loss
from compress_run.pipeline import lit_module
from tests.conftest import run_pipeline


def test_loss_is_the_deit_mixture_of_label_and_teacher_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    ce = F.cross_entropy(student, labels)
    hard = distillation_loss(student, teacher, labels, "hard", alpha=0.5)
    assert hard.item() == pytest.approx(0.5 * ce.item() + 0.5 * F.cross_entropy(student, teacher.argmax(1)).item())
    t = 2.0
    soft = distillation_loss(student, teacher, labels, "soft", alpha=1.0, temperature=t)
    p_teacher = F.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert soft.item() == pytest.approx(kl.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher, labels, "soft", alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_finetune_distils_from_the_train_stage_checkpoint(tmp_path, monkeypatch):
    seen: dict[str, list] = {"train": [], "finetune": []}
    original = lit_module.ClassifierModule.on_fit_start

    def spy(self):
        stage = "finetune" if self.hparams.lr == 0.02 else "train"
        seen[stage].append(self.distillation)
        original(self)

    monkeypatch.setattr(lit_module.ClassifierModule, "on_fit_start", spy)
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=magnitude", "schedule=fmnist",
                            "schedule.train.epochs=1", "schedule.finetune.epochs=1", "distill.teacher=train",
                            "distill.kind=hard", "evaluate.measure_latency=false"], tmp_path)
    assert seen["train"] == [None]
    (distillation,) = seen["finetune"]
    assert distillation is not None and distillation.kind == "hard"
    trained = torch.load(tmp_path / "checkpoints/train.ckpt", weights_only=False)["state_dict"]
    teacher_state = distillation.teacher.state_dict()
    assert all(torch.equal(teacher_state[k[4:]], v) for k, v in trained.items() if k.startswith("net."))
    assert results["metrics"]["model/prunable_sparsity"] > 0.85


def test_a_missing_teacher_is_refused_before_any_work(cli, tmp_path):
    proc = cli("dataset=digits", "debug=smoke", "logger=none", f"distill.teacher={tmp_path / 'nope.ckpt'}",
               f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "distill.teacher" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
