"""Provenance in every record: the code from git or the install stamp, the host's CPU model and flags, and the
other processes' CPU share while a stage ran."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import compress_run.pipeline.provenance as provenance
from compress_run.pipeline.provenance import LoadMonitor, code_version, host_info, host_key, run_load
from tests.conftest import REPO


def test_the_code_comes_from_git_in_a_checkout_and_from_the_stamp_in_an_installed_copy(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    found = code_version()
    assert found["source"] == "git" and found["commit"] == head and isinstance(found["dirty"], bool)

    installed = tmp_path / "site" / "compress_run"  # an installed copy: no git work tree whose src/ it is
    installed.mkdir(parents=True)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", installed)
    assert code_version() == {"commit": None, "dirty": None, "source": "unknown"}
    (installed / "_build_info.json").write_text(json.dumps({"commit": "ab" * 20, "dirty": True,
                                                            "stamped_at": "2026-12-07T00:00:00+00:00"}))
    assert code_version() == {"commit": "ab" * 20, "dirty": True, "source": "install stamp",
                              "stamped_at": "2026-12-07T00:00:00+00:00"}
    # a copy installed inside some other repository does not take that repository's commit
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "another project"], check=True)
    assert code_version()["source"] == "install stamp"
    (installed / "_build_info.json").write_text(json.dumps({"commit": None, "dirty": None}))
    assert code_version()["source"] == "unknown"


def test_the_host_names_its_cpu_model_flags_and_threads():
    host = host_info()
    assert host["processor"] and host["cpus"] >= 1 and host["torch_threads"] >= 1
    assert host["key"] == host_key(host) and host["processor"] in host["key"]
    if sys.platform == "linux":
        assert host["vendor"] and host["family_model_stepping"] and isinstance(host["isa"], list)
    # a record written before the key existed is keyed by its CPU model alone
    assert host_key({"processor": "Intel Xeon", "cpus": 2}) == "Intel Xeon"
    assert host_key({"processor": None}) is None and host_key(None) is None
    other = {**host, "key": None, "isa": [*(host["isa"] or []), "amx_tile"]}
    assert host_key(other) != host_key({**host, "key": None})  # other flags, another host


def test_the_load_monitor_counts_other_processes_and_not_its_own(tmp_path):
    monitor = LoadMonitor(interval=0.1, partial=tmp_path / "partial.json")
    monitor.started_at = "2026-12-07T00:00:00+00:00"
    monitor.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = monitor.stop()
    child = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert summary["measured"] and summary["others_cpu_s"] >= 0.8 * child  # at least the busy child
    assert 0 < summary["others_share"] <= summary["peak_share"] <= 1
    assert json.loads((tmp_path / "partial.json").read_text())["started_at"] == monitor.started_at

    resumed = LoadMonitor(interval=0.1, before=summary).start()
    time.sleep(0.3)
    added = resumed.stop()
    assert added["parts"] == 2 and added["others_cpu_s"] >= summary["others_cpu_s"]
    assert added["wall_s"] > summary["wall_s"]

    stages = {"train": {"status": "done", "load": summary}, "evaluate": {"status": "done", "load": added},
              "finetune": {"status": "skipped"}}
    run = run_load(stages)
    assert run["measured"] and run["stages_without"] == [] and run["peak_share"] == added["peak_share"]
    assert run_load({"train": {"status": "done"}}) == {"measured": False, "stages_without": ["train"]}


def test_a_commit_made_while_a_run_ran_is_not_its_code(monkeypatch):
    from compress_run.pipeline import results

    start = {"commit": "a" * 40, "dirty": False, "source": "git"}
    monkeypatch.setattr(results, "code_version", lambda: {"commit": "b" * 40, "dirty": False, "source": "git"})
    assert results.code_at_end(start) == {**start, "changed_during_run": True}
    monkeypatch.setattr(results, "code_version", lambda: dict(start))
    assert results.code_at_end(start) == start


def test_only_changes_to_the_code_make_a_tree_dirty(tmp_path):
    """Records or docs written into the checkout (a table run with records=docs/records/...) leave the code as
    committed; a change under src/ or conf/ does not, and is listed."""
    import subprocess

    from compress_run.pipeline.provenance import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for path in ("src/a.py", "conf/b.yaml", "docs/records/r.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    (tmp_path / "docs/records/r.json").write_text("1\n")
    assert git_state(tmp_path / "src")["dirty"] is False
    (tmp_path / "conf/b.yaml").write_text("1\n")
    state = git_state(tmp_path / "src")
    assert state["dirty"] is True and state["changed"] == ["conf/b.yaml"]
