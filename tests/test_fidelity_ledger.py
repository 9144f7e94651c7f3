"""The fidelity ledger (docs/fidelity.md) has a complete row for every method: each method YAML and each
quantizer and distillation path has a section naming the paper, the reference code read, the tests that pin the
authors' form (each of which exists) and the deviations; and the method's module docstring cites its reference
code too."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

LEDGER = REPO / "docs" / "fidelity.md"
FIELDS = ("Paper:", "Reference code read:", "Pinned by:", "Deviations:")
# paths outside conf/method that are methods of the line too: the quantizers and distillation
OTHER_ROWS = {"ptq": "compress_run.methods.ptq", "gptq": "compress_run.methods.gptq", "qat": "compress_run.methods.qat",
              "distill": "compress_run.methods.distill"}


def ledger_rows() -> dict[str, str]:
    """``### <name>`` sections of the ledger, by name."""
    text = LEDGER.read_text()
    parts = re.split(r"^### +(\S+)\s*$", text, flags=re.MULTILINE)
    return {name: re.split(r"^## ", body, flags=re.MULTILINE)[0]
            for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def method_rows() -> dict[str, str]:
    """Every method YAML's name and the module its ``_target_`` lives in, plus the other rows."""
    rows = {}
    for path in sorted((REPO / "conf" / "method").glob("*.yaml")):
        target = yaml.safe_load(path.read_text())["_target_"]
        rows[path.stem] = target.rsplit(".", 1)[0]
    return {**rows, **OTHER_ROWS}


@pytest.mark.parametrize("name", sorted(method_rows()))
def test_every_method_has_a_complete_ledger_row_whose_pinning_tests_exist(name):
    rows = ledger_rows()
    assert name in rows, f"docs/fidelity.md has no '### {name}' row"
    body = rows[name]
    for field in FIELDS:  # each with its text on the line or in the items below it
        assert re.search(rf"^\* {re.escape(field)}( *\S|\s*\n  - \S)", body, flags=re.MULTILINE), \
            f"{name}: no '{field}' line"
    pinned = re.search(r"^\* Pinned by:(.*?)(?=^\* )", body, flags=re.MULTILINE | re.DOTALL)
    tests = re.findall(r"(tests/[\w/]+\.py)::(\w+)", pinned.group(1))
    assert tests, f"{name}: 'Pinned by' names no test (tests/<file>.py::<test>)"
    for file, function in tests:
        path = REPO / file
        assert path.exists(), f"{name}: {file} does not exist"
        assert re.search(rf"^def {function}\(", path.read_text(), flags=re.MULTILINE), f"{name}: no {file}::{function}"


@pytest.mark.parametrize("name", sorted(method_rows()))
def test_the_method_docstring_cites_its_reference_code(name):
    module = importlib.import_module(method_rows()[name])
    assert "Reference code" in (module.__doc__ or ""), f"{module.__name__}'s docstring cites no reference code"


def test_the_ledger_has_no_row_for_a_method_that_does_not_exist():
    assert set(ledger_rows()) <= set(method_rows()), set(ledger_rows()) - set(method_rows())


def test_a_ledger_without_a_methods_row_fails_the_check(tmp_path, monkeypatch):
    """The check above can fail: a ledger missing the E-ViT row is caught."""
    broken = re.sub(r"^### evit\s*$.*?(?=^### )", "", LEDGER.read_text(), flags=re.MULTILINE | re.DOTALL)
    (tmp_path / "fidelity.md").write_text(broken)
    monkeypatch.setattr(sys.modules[__name__], "LEDGER", Path(tmp_path / "fidelity.md"))
    with pytest.raises(AssertionError, match="evit"):
        test_every_method_has_a_complete_ledger_row_whose_pinning_tests_exist("evit")
