"""Only a build step on top of pyproject.toml: a built copy of the package (a wheel, `pip install .`) carries the
commit and dirty flag of the tree it was built from in compress_run/_build_info.json, so a run from an installed
copy, where no git is found, still records its code (src/pipeline/provenance.py: code_version)."""

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def tree_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(__file__).parent.resolve():
            return {"commit": None, "dirty": None}  # a copy inside some other repository: not our history
        # the code's paths only (as provenance.CODE_PATHS): uncommitted records or docs leave the code as committed
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "src", "conf", "setup.py", "pyproject.toml")
        return {"commit": git("rev-parse", "HEAD"), "dirty": changed != ""}
    except (OSError, subprocess.SubprocessError):  # an sdist without .git: nothing to stamp
        return {"commit": None, "dirty": None}


class BuildWithStamp(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install runs from the checkout: git answers there
            return
        target = Path(self.build_lib) / "compress_run" / "_build_info.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({**tree_state(),
                                      "stamped_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


setup(cmdclass={"build_py": BuildWithStamp})
