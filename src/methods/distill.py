"""Knowledge distillation shared by every method and by the pipeline's train/finetune stages.

The loss is DeiT's form (Touvron et al. 2021), which COMCAT's released code uses:
``(1 - alpha) · CE(student, labels) + alpha · KD`` with

* ``soft``: KD = T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over the batch (Hinton et al.);
* ``hard``: KD = CE(student, argmax teacher) — the teacher's decision as a second label.

The teacher is given by the ``distill`` config (``distill.teacher``: a checkpoint, a run dir, or ``train``
for the run's own train-stage checkpoint, i.e. the network before compression); the pipeline builds it and
hands it to the LightningModule (``distill.stages``) and to the method (:attr:`Method.distill`), so a method
such as COMCAT distils through the same path in its own passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("soft", "hard")


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
    """``(1 - alpha) · CE + alpha · KD`` with KD ``soft`` (KL at ``temperature``) or ``hard`` (CE on argmax)."""
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if kind == "hard":
        kd = F.cross_entropy(student, teacher.argmax(1))
    elif kind == "soft":
        t = temperature
        kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                      reduction="batchmean") * t * t
    else:
        raise ValueError(f"distillation kind {kind!r}; known: {', '.join(KINDS)}")
    return (1.0 - alpha) * ce + alpha * kd
