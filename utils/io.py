"""Atomic file output: every file is written to a temporary sibling and renamed into place, so an
interrupted run never leaves a half-written result behind."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def publish(tmp, path) -> None:
    """Rename a finished temporary file into place, with normal permissions (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent} ({e.strerror}): choose a writable folder "
                        "or fix its permissions") from e
    try:
        yield Path(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path, rows: list[dict]) -> None:
    """Rows of dicts -> CSV with the union of keys as header, in first-seen order."""
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def torch_save(path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_writable(folder) -> Path:
    """Fail before any long computation if results could not be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable ({e.strerror}): fix its "
                        "permissions or run from a copy of the record") from e
    return folder
