"""A defense's outputs as one set: staged, locked, sealed, swapped into place.

The output folder lies inside the record folder, which the record's author made. So:
  - folders below the record folder are opened and created without following symbolic links
    (a record shipping `defense/ulrl -> ~/somewhere` is refused, not written through);
  - a run writes into a fresh `defense/.<method>.tmp-*` folder and only `commit` swaps it into
    place: the previous result stays whole until then, and a failed or interrupted run removes its
    folder (a killed one's is removed by the next run);
  - `defense/.<method>.lock` (flock, held for the run, removed after) makes a second run on the
    same record, method and tag fail at once with one line instead of mixing two runs' files;
  - summary.json carries a seal: the SHA-256 of the set's other files (log and charts aside) and
    an HMAC over them and the summary, keyed with a secret of this machine's user
    (~/.config/ulrl/result.key, or $ULRL_RESULT_KEY). A result shipped inside a record, or
    assembled from two runs, does not verify (`verify_summary`), so the sweep reruns it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
from pathlib import Path

from utils.core.errors import UserError, shown

SEAL_KEY = "result_seal"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def link_error(path) -> UserError:
    return UserError(f"{shown(path, 300)} is a symbolic link; outputs are never written through "
                     "links below the record folder (a record can ship one): remove the link, "
                     "then rerun")


def open_folder(base, parts, create: bool):
    """A file descriptor of base/parts[0]/parts[1]/..., opened one level at a time without
    following links (a missing level is created when `create`, else None is returned)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = Path(base)
    try:
        for part in parts:
            path = path / part
            try:
                new = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:  # a concurrent run (another method) made it first
                    pass
                new = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                    if stat.S_ISLNK(mode):
                        raise link_error(path) from None
                raise
            os.close(fd)
            fd = new
    except OSError as e:
        os.close(fd)
        raise UserError(f"output folder {path} is not writable ({e.strerror}): fix its "
                        "permissions or run from a copy of the record") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_output_folder(record_folder, method: str, below: tuple[str, ...] = ("defense",)) -> Path:
    """Fail before any long computation if record_folder/defense/<method> (or the folders
    `below` instead of defense/) could not be written (a link, a file, no permission). Creates
    nothing, so a run refused here leaves no folder."""
    out = Path(record_folder).joinpath(*below, method)
    fd = open_folder(record_folder, list(below), create=False)
    if fd is not None:
        try:
            _check_final(fd, out)
        finally:
            os.close(fd)
    where = out.parent if fd is not None else Path(record_folder)
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable ({where}: permission denied): fix "
                        "its permissions or run from a copy of the record")
    return out


def _check_final(defense_fd: int, out: Path) -> None:
    try:
        mode = os.stat(out.name, dir_fd=defense_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise link_error(out)
    if not stat.S_ISDIR(mode):
        raise UserError(f"output folder {out} is not writable (it is a file): remove it or run "
                        "from a copy of the record")


def create_file_below(dir_fd: int, name: str, flags: int, mode: int, path: Path,
                      failure: str) -> int:
    """dir_fd/name opened with `flags`, created if missing, never through a link: a link is one
    clear line, any other failure `failure` with "{reason}" replaced (not str.format: a path may
    hold braces)."""
    try:
        return os.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path) from None
        raise UserError(failure.replace("{reason}", e.strerror)) from None


def _lock(dir_fd: int, name: str, out: Path) -> int:
    """flock on dir/name, created without following links; a lock file that a finishing run
    removed while we waited for it is not the lock any more, so it is taken again."""
    while True:
        lock = out.parent / name
        fd = create_file_below(dir_fd, name, os.O_RDWR, 0o600, lock,
                               f"cannot create the lock {lock} ({{reason}}): fix the folder's "
                               "permissions")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another run is writing {out} (it holds {out.parent / name}): wait "
                            "for it to finish, or pass another --tag for a separate result") from None
        try:
            current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


class ResultSet:
    """`with ResultSet(record_folder, method) as result:` write into result.stage; leaving the
    block without an exception swaps the stage into place as record_folder/defense/<method> (or
    the folders `below` instead of defense/), leaving it with one removes the stage. The lock is
    held in between."""

    def __init__(self, record_folder, method: str, below: tuple[str, ...] = ("defense",)):
        self.final = Path(record_folder).joinpath(*below, method)
        self.record_folder, self.method, self.below = Path(record_folder), method, list(below)
        self.stage: Path | None = None
        self._dir = self._lock = None

    def __enter__(self) -> "ResultSet":
        self._dir = open_folder(self.record_folder, self.below, create=True)
        try:
            self._lock = _lock(self._dir, f".{self.method}.lock", self.final)
            _check_final(self._dir, self.final)
            self._recover()
            name = f".{self.method}.tmp-{secrets.token_hex(4)}"
            os.mkdir(name, dir_fd=self._dir)
            self.stage = self.final.parent / name
        except BaseException:
            self._release()
            raise
        return self

    def _recover(self) -> None:
        """What a killed run of this method left (the lock says none is running): its stage, and
        the previous result if it died between the two renames of commit."""
        left = [n for n in os.listdir(self._dir) if n.startswith((f".{self.method}.tmp-",
                                                                    f".{self.method}.old-"))]
        old = [n for n in left if n.startswith(f".{self.method}.old-")]
        if old and not self._exists(self.method):
            os.rename(old[0], self.method, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            left.remove(old[0])
        for name in left:
            shutil.rmtree(name, dir_fd=self._dir)

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._dir, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def commit(self) -> None:
        """Previous result aside, the stage into place, the previous result removed."""
        old = None
        try:
            if self._exists(self.method):
                old = f".{self.method}.old-{secrets.token_hex(4)}"
                os.rename(self.method, old, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            os.rename(self.stage.name, self.method, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError as e:
            raise UserError(f"cannot move the result into {self.final} ({e.strerror}): check the "
                            "disk and the folder, then rerun") from None
        self.stage = None
        if old:
            shutil.rmtree(old, dir_fd=self._dir)

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            if self.stage is not None:
                shutil.rmtree(self.stage.name, dir_fd=self._dir, ignore_errors=True)
                self.stage = None
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.unlink(f".{self.method}.lock", dir_fd=self._dir)  # before unlocking: see _lock
            os.close(self._lock)
            self._lock = None
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None


# ---------------------------------------------------------------- the seal

def _key() -> bytes:
    """This user's secret for sealing results, made on first use (32 random bytes, mode 0600)."""
    path = Path(os.environ.get("ULRL_RESULT_KEY") or Path.home() / ".config/ulrl/result.key")
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # fails if a concurrent run made it first: then use that one
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        key = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read or create the result key {path} ({e.strerror}): make "
                        "its folder writable or set ULRL_RESULT_KEY to a file path") from None
    if len(key) < 16:
        raise UserError(f"the result key {path} is shorter than 16 bytes: remove it (a new one "
                        "is made) or set ULRL_RESULT_KEY")
    return key


def _sealed_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a result set except summary.json, the log and the charts (which
    `python -m utils.plots` may redraw)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "summary.json" and p.suffix not in (".log", ".png")
            and not p.name.startswith(".")}


def _mac(files: dict, summary: dict) -> str:
    message = json.dumps({"files": files, "summary": summary}, sort_keys=True, default=str)
    return hmac.new(_key(), message.encode(), hashlib.sha256).hexdigest()


def seal(folder, summary: dict) -> dict:
    """summary with the seal of the result set in `folder` (all its other files written)."""
    summary = json.loads(json.dumps(summary, default=str))  # as summary.json will read back
    files = _sealed_files(Path(folder))
    return {**summary, SEAL_KEY: {"files": files, "hmac": _mac(files, summary)}}


def verify_summary(path) -> str | None:
    """None when `path` is the summary.json of a complete, unmodified result set this user's
    runs sealed; else why not."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 16 * 2**20:
        return "not a regular summary file"
    try:
        summary = json.loads(path.read_text())
        found = summary.pop(SEAL_KEY)
        files, mac = found["files"], found["hmac"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "no seal of this tool"
    if not isinstance(files, dict) or "defense_result.pt" not in files or not isinstance(mac, str):
        return "no seal of this tool"
    if any(p.is_symlink() for p in path.parent.iterdir()) or \
            _sealed_files(path.parent) != files:
        return "its files differ from the ones it was written with"
    if not hmac.compare_digest(_mac(files, summary), mac):
        return "its seal was not made by this user's runs"
    return None
