"""Atomic file output: every file is written to a temporary sibling and renamed into place, so an
interrupted run never leaves a half-written result behind."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.core.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def publish(tmp, path) -> None:
    """Rename a finished temporary file into place, with normal permissions (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


@contextmanager
def atomic_file(path):
    """Yield a binary file open on a temporary sibling of `path`; on success it replaces `path`.
    On any error the temporary file is removed, and a failed write (disk full, quota, I/O error)
    becomes one UserError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent} ({e.strerror}): choose a writable folder "
                        "or fix its permissions") from e
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        publish(tmp, path)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise UserError(f"cannot write {path} ({e.strerror or e}): "
                        + ("free disk space" if full else "check the disk and the folder")
                        + " or choose another folder, then rerun") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as file:
        file.write(data)


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
    # Through a Python file object: torch's own file writer reports a full disk as an
    # unexplained "unexpected pos" RuntimeError, a Python file as OSError ENOSPC.
    with atomic_file(path) as file:
        torch.save(obj, file)
