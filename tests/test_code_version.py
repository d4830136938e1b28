"""summary.json's environment names the code that ran: the project checkout's git commit and
whether tracked files were changed; null for both, never an error, without a checkout or git."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from utils.core import cli

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], capture_output=True, text=True, check=True).stdout


def repository(folder: Path) -> Path:
    """A git repository with one committed file."""
    folder.mkdir(parents=True)
    git(folder, "init", "-q")
    (folder / "code.py").write_text("x = 1\n")
    git(folder, "add", "code.py")
    git(folder, "commit", "-q", "-m", "one")
    return folder


@needs_git
def test_environment_names_this_checkouts_commit():
    if not (ROOT / ".git").exists():
        pytest.skip("the project is not a git checkout here")
    env = cli.environment(torch.device("cpu"))
    assert env["git_commit"] == git(ROOT, "rev-parse", "HEAD").strip()
    assert isinstance(env["git_dirty"], bool)


@needs_git
def test_dirty_means_changed_tracked_files_not_outputs(tmp_path, monkeypatch):
    project = repository(tmp_path / "project").resolve()
    monkeypatch.setattr(cli, "PROJECT_ROOT", project)
    commit = git(project, "rev-parse", "HEAD").strip()
    assert cli.code_version() == {"git_commit": commit, "git_dirty": False}
    (project / "record" / "r").mkdir(parents=True)  # a record folder inside the checkout
    (project / "record" / "r" / "summary.json").write_text("{}")
    assert cli.code_version()["git_dirty"] is False
    (project / "code.py").write_text("x = 2\n")
    assert cli.code_version() == {"git_commit": commit, "git_dirty": True}


@needs_git
def test_no_checkout_of_its_own_is_null(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "PROJECT_ROOT", tmp_path.resolve())  # no repository at all
    assert cli.code_version() == {"git_commit": None, "git_dirty": None}
    outer = repository(tmp_path / "outer").resolve()
    (outer / "copy").mkdir()  # a copy of the project unpacked inside some other repository
    monkeypatch.setattr(cli, "PROJECT_ROOT", outer / "copy")
    assert cli.code_version() == {"git_commit": None, "git_dirty": None}


def test_missing_or_hanging_git_is_null(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert cli.code_version() == {"git_commit": None, "git_dirty": None}
    fake = tmp_path / "git"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/bin{os.pathsep}/usr/bin")
    monkeypatch.setattr(cli, "GIT_TIMEOUT_S", 0.5)
    env = cli.environment(torch.device("cpu"))
    assert env["git_commit"] is None and env["git_dirty"] is None and env["device"] == "cpu"
