"""Every published table is rebuilt from the committed records by the command RESULTS.md prints for it, and the
README's generated table lines are up to date."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys

import pytest
from rich.console import Console

from compress_run.pipeline.table_cli import run
from tests.conftest import REPO

PUBLISHED = sorted((REPO / "docs" / "tables").glob("*/table.json"))


def printed_commands() -> dict[str, str]:
    """Table name -> the command RESULTS.md prints for it."""
    text = (REPO / "RESULTS.md").read_text()
    found = re.findall(r"^\* Command: `(compress-table [^`]+)`$", text, flags=re.M)
    return {re.search(r"table=(\S+)", c).group(1): c for c in found}


def test_results_prints_a_command_for_every_published_table():
    assert set(printed_commands()) == {p.parent.name for p in PUBLISHED}


@pytest.mark.parametrize("table_json", PUBLISHED, ids=lambda p: p.parent.name)
def test_the_printed_command_rebuilds_the_published_table(table_json, tmp_path, monkeypatch):
    command = printed_commands()[table_json.parent.name]
    args = shlex.split(command)[1:]
    assert "--collect" in args and any(a.startswith("records=docs/records/") for a in args), command
    args = [a if not a.startswith("output_dir=") else f"output_dir={tmp_path}" for a in args]  # as pasted, elsewhere
    monkeypatch.chdir(REPO)
    assert run(args, Console(file=io.StringIO())) == 0
    published, rebuilt = json.loads(table_json.read_text()), json.loads((tmp_path / "table.json").read_text())
    for key in ("rows", "orderings", "commits", "code_unknown", "cpus"):
        assert rebuilt[key] == published[key], key


def test_the_readme_lines_are_generated_from_the_published_tables():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_results import README_END, README_START, readme_line
    finally:
        sys.path.remove(str(REPO / "scripts"))
    block = (REPO / "README.md").read_text().partition(README_START)[2].partition(README_END)[0]
    expected = [readme_line(json.loads(p.read_text())) for p in PUBLISHED]
    assert block.strip().splitlines() == expected, "run `make results`"
