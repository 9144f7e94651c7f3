"""The shared distillation path: the DeiT-form loss (soft and hard), and any method's finetune stage distilling
from a teacher checkpoint (here the run's own train stage) while its train stage does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress_run.methods.distill import distillation_loss
from compress_run.pipeline import lit_module
from tests.conftest import run_pipeline


def deit_soft_kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """DeiT's soft term (facebookresearch/deit losses.py, DistillationLoss) written out by hand:
    T² · Σ_batch Σ_classes p_teacher · (log p_teacher − log p_student) / (batch × classes)."""
    log_student = student / t - torch.logsumexp(student / t, 1, keepdim=True)
    log_teacher = teacher / t - torch.logsumexp(teacher / t, 1, keepdim=True)
    return (log_teacher.exp() * (log_teacher - log_student)).sum() * t * t / (student.shape[0] * student.shape[1])


def test_loss_is_the_deit_mixture_of_label_and_teacher_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3
    labels = torch.randint(0, 10, (8,))
    ce = F.cross_entropy(student, labels)
    hard = distillation_loss(student, teacher, labels, "hard", alpha=0.5)
    assert hard.item() == pytest.approx(0.5 * ce.item() + 0.5 * F.cross_entropy(student, teacher.argmax(1)).item())

    # soft: the summed KL over batch x classes (not over the batch: 10x weaker here), times T², mixed by alpha;
    # label smoothing reaches the label term only
    t, alpha = 2.0, 0.3
    kd = deit_soft_kd(student, teacher, t)
    soft = distillation_loss(student, teacher, labels, "soft", alpha=alpha, temperature=t, label_smoothing=0.1)
    expected = (1 - alpha) * F.cross_entropy(student, labels, label_smoothing=0.1) + alpha * kd
    assert soft.item() == pytest.approx(expected.item(), rel=1e-5)
    only_kd = distillation_loss(student, teacher, labels, "soft", alpha=1.0, temperature=t)
    assert only_kd.item() == pytest.approx(kd.item(), rel=1e-5)
    per_example = kd * student.shape[1]  # the batch-mean scale the loss had before
    assert abs(only_kd.item() - per_example.item()) > 0.5 * per_example.item()
    assert distillation_loss(teacher, teacher, labels, "soft", alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_batchmean_is_spvit_s_per_example_kl():
    """SPViT's released DistillDiffPruningLoss: CE + w · KL(batchmean, T = 1); alpha = w / (1 + w) keeps the
    balance at 1 / (1 + w) of the scale."""
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 10) * 2, torch.randn(6, 10) * 2
    labels = torch.randint(0, 10, (6,))
    w = 0.5
    log_student, log_teacher = F.log_softmax(student, 1), F.log_softmax(teacher, 1)
    spvit = F.cross_entropy(student, labels) + w * (log_teacher.exp() * (log_teacher - log_student)).sum(1).mean()
    ours = distillation_loss(student, teacher, labels, "soft_batchmean", alpha=w / (1 + w))
    assert ours.item() == pytest.approx(spvit.item() / (1 + w), rel=1e-5)
    assert distillation_loss(student, teacher, labels, "soft_batchmean", alpha=1.0).item() == pytest.approx(
        10 * deit_soft_kd(student, teacher, 1.0).item(), rel=1e-5)  # classes x DeiT's soft term


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
