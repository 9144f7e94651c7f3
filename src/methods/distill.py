"""Knowledge distillation shared by every method and by the pipeline's train/finetune stages.

Paper: Touvron et al., "Training data-efficient image transformers & distillation through attention" (DeiT),
ICML 2021; soft distillation after Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
Reference code: facebookresearch/deit — losses.py: DistillationLoss.forward (LPViT and E-ViT train with copies
of it); for a student with one head, jinqixiao/ComCAT — VisionTransformer/losses.py:
DistillationLossWithoutToken.forward (the same loss on the student's only logits). The loss is
``(1 - alpha) · CE(student, labels) + alpha · KD`` with

* ``soft``: KD = T² · Σ KL(softmax(teacher / T) ‖ softmax(student / T)) / (batch × classes) — DeiT's
  ``F.kl_div(..., reduction='sum', log_target=True) * T * T / outputs_kd.numel()``: the summed KL divided by
  every logit of the batch, not by the batch size (so the KD term is 1/classes of the per-example KL);
* ``hard``: KD = CE(student, argmax teacher) — the teacher's decision as a second label;
* ``soft_batchmean``: KD = T² · Σ KL(...) / batch — the per-example KL (``reduction='batchmean'``) of
  DynamicViT's loss as SPViT releases it (PeiyanFlying/SPViT — losses.py: DistillDiffPruningLoss.forward,
  ``cls_kl_loss`` at T = 1, weighted ``distill_weight`` next to the label term's 1: α = w / (1 + w) gives the
  same balance at 1 / (1 + w) of the scale), ``classes``× DeiT's ``soft``.

The label term takes the run's label smoothing (DeiT's base criterion); the KD term never does. The teacher is
given by the ``distill`` config (``distill.teacher``: a checkpoint, a run dir, or ``train`` for the run's own
train-stage checkpoint, i.e. the network before compression); the pipeline builds it and hands it to the
LightningModule (``distill.stages``) and to the method (:attr:`Method.distill`), so a method such as COMCAT
distils through the same path in its own passes.

Config keys (conf/config.yaml ``distill``): ``teacher`` (null: off), ``kind`` (soft), ``alpha`` (0.5, DeiT's
``--distillation-alpha``), ``temperature`` (1.0, DeiT's ``--distillation-tau``), ``stages`` ([finetune]);
``kind``: soft | hard | soft_batchmean.

Deviations: DeiT applies the KD term to a separate distillation-token head (its loss refuses a model with one
output); our students have one head, so both terms act on the same logits, as COMCAT's
DistillationLossWithoutToken does (no model here has a distillation token). DeiT's label term is timm's
LabelSmoothingCrossEntropy (SoftTargetCrossEntropy on Mixup/CutMix targets); ours is ``F.cross_entropy`` with
the run's label smoothing on the targets the stage passes (class indices, or mixed class probabilities) (ours).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("soft", "hard", "soft_batchmean")


@dataclass
class Distillation:
    teacher: nn.Module
    kind: str = "soft"
    alpha: float = 0.5
    temperature: float = 1.0

    def loss(self, student_logits: torch.Tensor, labels: torch.Tensor, x: torch.Tensor,
             label_smoothing: float = 0.0, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The distilled training loss of a batch ``x`` (the teacher runs here unless its logits are given)."""
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        return distillation_loss(student_logits, teacher_logits, labels, self.kind, self.alpha, self.temperature,
                                 label_smoothing)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, kind: str = "soft",
                      alpha: float = 0.5, temperature: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - alpha) · CE + alpha · KD`` with KD ``soft`` (DeiT's KL at ``temperature``, over batch × classes),
    ``soft_batchmean`` (the same KL over the batch only) or ``hard`` (CE on the teacher's argmax)."""
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if kind == "hard":
        kd = F.cross_entropy(student, teacher.argmax(1))
    elif kind in ("soft", "soft_batchmean"):
        t = temperature
        kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="sum", log_target=True)
        kd = kl * (t * t) / (student.numel() if kind == "soft" else student.shape[0])
    else:
        raise ValueError(f"distillation kind {kind!r}; known: {', '.join(KINDS)}")
    return (1.0 - alpha) * ce + alpha * kd
