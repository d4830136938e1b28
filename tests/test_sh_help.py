"""Every sh/ script answers --help and -h with a usage text, exit code 0, and runs nothing else:
the programs a script could start are stubs on PATH that leave a mark when called."""
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "sh").glob("*.sh"))
# what the scripts start: the project's Python, installers, schedulers, GPU and CPU tools
WATCHED = ("python", "python3", "pip", "pip3", "apt-get", "sbatch", "squeue", "sinfo", "scontrol",
           "slurmctld", "slurmd", "munged", "mungekey", "runuser", "nvidia-smi", "taskset", "nproc")


@pytest.fixture()
def watched_path(tmp_path):
    """A PATH whose watched programs are stubs that record their call in tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in WATCHED:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\nexit 0\n')
        stub.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", tmp_path / "calls"


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10 and ROOT / "sh/test.sh" in SCRIPTS


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_is_a_usage_text_and_runs_nothing(script, flag, watched_path, tmp_path):
    path, calls = watched_path
    start = time.monotonic()
    done = subprocess.run(["bash", str(script), flag], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=tmp_path, env={**os.environ, "PATH": path})
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ") and f"sh/{script.name}" in done.stdout.splitlines()[0]
    assert len(done.stdout.splitlines()) >= 3  # a description, not just the synopsis
    assert not any(line.startswith("#") for line in done.stdout.splitlines())  # no script lines
    assert done.stderr == ""
    assert not calls.exists(), f"--help ran: {calls.read_text()}"
    assert elapsed < 60  # bash prints a usage text in milliseconds; this catches one that works
