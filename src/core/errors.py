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
