"""User-facing errors: one paragraph naming the cause and the fix, exit code 2."""

from __future__ import annotations

import textwrap

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Printed as one paragraph, exit code 2."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause} {fix}")
        self.cause = cause
        self.fix = fix

    def paragraph(self) -> str:
        text = f"compress-run: error: {self.cause.rstrip('.')}. Fix: {self.fix.rstrip('.')}."
        return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the run stops at that step (exit code 2), before the optimizer
    applies it, and names the stage, epoch and step."""

    def __init__(self, stage: str, epoch: int, step: int, loss: float) -> None:
        lr_key = f"schedule.{stage}.lr" if stage in ("train", "finetune") else "schedule.finetune.lr (or quant.lr)"
        super().__init__(f"training diverged: the {stage} stage's loss is {loss} at epoch {epoch}, step {step}; "
                         "the stage stopped there and its last finished checkpoint is kept",
                         f"lower {lr_key}, set trainer.gradient_clip_val (e.g. 1.0), or check the data for "
                         "NaN/inf values; run again with a new output_dir")
        self.stage, self.epoch, self.step = stage, epoch, step
