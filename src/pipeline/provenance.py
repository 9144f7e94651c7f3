"""Where a run's numbers come from, written into every results.json: the code, the host and the machine's load.

* **Code** (:func:`code_version`): the commit and dirty flag from git when the package runs from a checkout (or
  an editable install of one); otherwise the stamp ``_build_info.json`` that ``setup.py`` writes into the
  package when a wheel or an installed copy is built (the commit and dirty flag of the tree it was built from);
  otherwise ``commit: null`` with ``source: unknown``. The three are told apart by ``source``.
* **Host** (:func:`host_info`): CPU model, vendor, family/model/stepping, the instruction-set flags that change
  what the kernels do (AVX2, AVX-512, VNNI, BF16, AMX), the CPUs this process may use, torch's threads and CPU
  capability, the BLAS/oneDNN builds and the GPU. ``key`` names the CPU model: two records compare on one host
  only when their keys match (:func:`host_key` also reads records written before the key existed).
* **Load** (:class:`LoadMonitor`): the CPU seconds the *other* processes used while a stage ran, sampled from
  ``/proc/stat`` (the whole machine's busy time) less this process's own CPU time, as a share of all the
  machine's CPUs: 0 on a quiet machine, 0.5 when another process kept one of two cores busy. Linux only
  (elsewhere the 1-minute load average alone, said so). Data-loading worker processes count as others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent
STAMP_NAME = "_build_info.json"
# the instruction sets that change which kernels run (oneDNN / MKL / FBGEMM dispatch on these)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
QUIET_SHARE = 0.05  # other processes below 5% of the machine's CPUs: a quiet run
# the paths whose content is the code a run executes (the package: src/ and its configs in conf/, and how it is
# built); uncommitted changes elsewhere in the tree (records, docs, results) leave the code as committed
CODE_PATHS = ("src", "conf", "setup.py", "pyproject.toml")


def git_state(directory: Path) -> dict[str, Any] | None:
    """The commit of the git work tree whose ``src/`` is ``directory`` and whether its code differs from it (tracked
    changes under :data:`CODE_PATHS`, listed in ``changed``), or None."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "src" != directory.resolve():  # an installed copy inside some other repository: not our code
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--",
                      *(f":(top){path}" for path in CODE_PATHS)).splitlines()
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed),
                **({"changed": [line.split(maxsplit=1)[-1] for line in changed[:20]]} if changed else {})}
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict[str, Any]:
    """The code this process runs: ``{"commit", "dirty", "source": git | install stamp | unknown}``."""
    found = git_state(PACKAGE_DIR)
    if found is not None:
        return {**found, "source": "git"}
    with contextlib.suppress(OSError, ValueError, KeyError):
        stamp = json.loads((PACKAGE_DIR / STAMP_NAME).read_text())
        if stamp.get("commit"):  # a copy built where no history of ours was found stamps nothing
            return {"commit": stamp["commit"], "dirty": stamp["dirty"], "source": "install stamp",
                    "stamped_at": stamp.get("stamped_at")}
    return {"commit": None, "dirty": None, "source": "unknown"}


def cpu_info() -> dict[str, Any]:
    """The first CPU's model, vendor, family/model/stepping and instruction-set flags (Linux ``/proc/cpuinfo``;
    elsewhere ``platform.processor()`` only)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough: a host's CPUs are one model
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"processor": fields.get("model name") or platform.processor() or platform.machine(),
            "vendor": fields.get("vendor_id"),
            "family_model_stepping": "/".join(fields[k] for k in ("cpu family", "model", "stepping") if k in fields)
            or None,
            "isa": [f for f in ISA_FLAGS if f in flags] if flags else None}


def host_info() -> dict[str, Any]:
    """Where the run ran (see the module docstring); ``key`` identifies the CPU model and its flags."""
    cpu = cpu_info()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    backends = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
                "openmp": torch.backends.openmp.is_available()}
    return {"machine": platform.machine(), "system": platform.system(), **cpu, "cpus": cpus,
            "machine_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "backends": backends,
            "gpu": gpu, "key": host_key(cpu)}


def host_key(host: dict[str, Any] | None) -> str | None:
    """The CPU model a record ran on: ``processor (vendor family/model/stepping; flags digest)``, or for a record
    written before those fields existed its ``processor`` alone (None: unknown)."""
    if not host or not host.get("processor"):
        return None
    if host.get("key"):
        return str(host["key"])
    if host.get("isa") is None and host.get("family_model_stepping") is None:
        return str(host["processor"])
    digest = hashlib.sha1(",".join(host.get("isa") or []).encode()).hexdigest()[:8]
    return f"{host['processor']} ({host.get('vendor')} {host.get('family_model_stepping')}; isa {digest})"


def host_model(host: dict[str, Any] | None) -> str | None:
    """The CPU model name alone (what a reader recognises): ``processor``."""
    return None if not host else host.get("processor")


class LoadMonitor:
    """Samples the other processes' CPU share every ``interval`` seconds in a daemon thread while running.

    ``summary()`` gives the share over the whole time (``others_share``: other processes' CPU seconds over
    wall seconds × the machine's CPUs), the largest share of one interval (``peak_share``), the cumulative
    ``others_cpu_s`` and ``wall_s`` (so a resumed stage can add its parts) and ``quiet`` (below 5%)."""

    def __init__(self, interval: float = 2.0, partial: Path | None = None, before: dict[str, Any] | None = None
                 ) -> None:
        # partial: a file the measure so far is written to every 15 samples, so a stage resumed after a crash
        # adds the part before it (``before``, read back from that file)
        self.interval, self.partial, self.before = interval, partial, before
        self.cpus = os.cpu_count() or 1
        self.available = self._busy_seconds() is not None
        self.others_cpu_s = self.wall_s = self.peak_share = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[float, float, float] | None = None
        self.load_average: list[float] = []
        self.started_at: str | None = None  # the stage's first start (kept across a resume)

    @staticmethod
    def _busy_seconds() -> float | None:
        """The machine's busy CPU seconds since boot (all CPUs): /proc/stat's first line less idle and iowait."""
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values[:8]) - idle) / ticks  # guest time is already inside user/nice

    def _mark(self) -> tuple[float, float, float] | None:
        busy = self._busy_seconds()
        return None if busy is None else (time.perf_counter(), busy, time.process_time())

    def _sample(self) -> None:
        now = self._mark()
        if now is None:  # a failed read: skipped (a difference from nothing would be "since boot")
            return
        if self._last is not None:
            wall = now[0] - self._last[0]
            others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2]))
            if wall > 0:
                self.wall_s += wall
                self.others_cpu_s += others
                self.peak_share = max(self.peak_share, min(1.0, others / (wall * self.cpus)))
                self.samples += 1
        self._last = now

    def _save_partial(self) -> None:
        if self.partial is not None:
            with contextlib.suppress(OSError):
                tmp = self.partial.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.summary()))
                os.replace(tmp, self.partial)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
            if self.samples % 15 == 0:
                self._save_partial()

    def start(self) -> LoadMonitor:
        if hasattr(os, "getloadavg"):
            self.load_average.append(round(os.getloadavg()[0], 2))
        if self.available:
            self._last = self._mark()
            self._save_partial()
            self._thread = threading.Thread(target=self._loop, name="load-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self._thread = None
            self._save_partial()  # a stage that failed resumes with this part counted (removed after success)
        if hasattr(os, "getloadavg"):
            self.load_average.append(round(os.getloadavg()[0], 2))
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """This monitor's measure, added to ``before`` (the same stage's measure before a resume) if given."""
        before = self.before
        if not self.available:
            return {"measured": False, "reason": "no /proc/stat on this system: 1-minute load average only",
                    "load_average_1m": self.load_average}
        others = self.others_cpu_s + float((before or {}).get("others_cpu_s", 0.0))
        wall = self.wall_s + float((before or {}).get("wall_s", 0.0))
        share = min(1.0, others / (wall * self.cpus)) if wall > 0 else 0.0
        peak = max(self.peak_share, float((before or {}).get("peak_share", 0.0)))
        return {"measured": True, "others_share": round(share, 4), "peak_share": round(peak, 4),
                "others_cpu_s": round(others, 2), "wall_s": round(wall, 2), "machine_cpus": self.cpus,
                "quiet": share < QUIET_SHARE, "load_average_1m": self.load_average,
                "parts": 1 + int((before or {}).get("parts", 0)), "started_at": self.started_at}


def run_load(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A run's load from its stages' measures: the CPU share of other processes over all the stages' time."""
    measured = {s: r["load"] for s, r in stages.items() if r.get("status") == "done" and r.get("load", {})
                .get("measured")}
    unmeasured = [s for s, r in stages.items() if r.get("status") == "done" and not r.get("load", {})
                  .get("measured")]
    if not measured:
        return {"measured": False, "stages_without": unmeasured}
    others = sum(m["others_cpu_s"] for m in measured.values())
    wall = sum(m["wall_s"] for m in measured.values())
    cpus = max(m["machine_cpus"] for m in measured.values())
    share = min(1.0, others / (wall * cpus)) if wall > 0 else 0.0
    return {"measured": True, "others_share": round(share, 4),
            "peak_share": max(m["peak_share"] for m in measured.values()), "quiet": share < QUIET_SHARE and
            not unmeasured, "stages_without": unmeasured}
