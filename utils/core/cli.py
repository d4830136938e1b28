"""What every command-line entry point shares: one-line errors, a log file, progress bars,
seeding, and the environment block of a summary (versions, device, the code's git commit)."""
from __future__ import annotations

import logging
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.core.errors import UserError
from utils.core.io import publish

log = logging.getLogger("backdoor")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 10.0  # git answers in milliseconds; this only bounds a hung one


DEBUG_FLAG = "--debug"  # accepted by every entry point (utils.core.config.parse_config declares it)


def one_line(text: str) -> str:
    """A message as one line: the contract of an error is a single line on stderr."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class _Terminated(BaseException):
    """SIGTERM (e.g. `timeout`, a job scheduler) raised as an exception, so that `finally` blocks
    remove temporary files just as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main_guard(main, argv=None):
    """Run `main()` (or `main(argv)` when argv is given). A UserError ends the program with one line
    "error: ..." and exit code 2; any other exception with one line naming its type and exit code
    1; Ctrl-C or SIGTERM with "interrupted" and 130 / 143. With --debug among the arguments the
    full traceback is printed instead of the line."""
    debug = DEBUG_FLAG in (sys.argv[1:] if argv is None else list(argv))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main() if argv is None else main(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        elif not getattr(e, "logged", False):  # a run that logged it has already shown the line
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, _Terminated) as e:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM)
    except Exception as e:  # a bug or an unforeseen failure: still one line for the user
        if debug:
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), "").strip()
        print(f"error: {type(e).__name__}: {first} (rerun with {DEBUG_FLAG} for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _ConsoleHandler(logging.Handler):
    """Writes to sys.stdout or sys.stderr as they are when a line is logged (so a redirected or
    captured stream receives it), through tqdm so a line does not land in a progress bar."""

    def __init__(self, stream_name: str):
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=getattr(sys, self.stream_name))
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_console_logging() -> None:
    """Progress to stdout, warnings and errors to stderr (so stderr holds only what went wrong)."""
    if not log.handlers:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        info = _ConsoleHandler("stdout")
        info.addFilter(lambda record: record.levelno < logging.WARNING)
        problems = _ConsoleHandler("stderr")
        problems.setLevel(logging.WARNING)
        for handler in (info, problems):
            handler.setFormatter(fmt)
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@contextmanager
def log_file(path):
    """Log to a temporary sibling of `path`, renamed into place when the run ends (also on error,
    so a failed run leaves its complete log, never a half-written result)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    handler = logging.FileHandler(tmp)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        publish(tmp, path)


def progress(total: int, desc: str):
    """A progress bar on a terminal; silent in logs and CI (tqdm's disable=None)."""
    return tqdm(total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int = 0) -> int:
    """torch's CPU threads: `threads`, or the cores this process may run on (torch's own default
    counts the host's cores, which oversubscribes a container limited to fewer)."""
    torch.set_num_threads(threads if threads > 0 else available_cores())
    return torch.get_num_threads()


def peak_memory_mib(device: torch.device) -> dict:
    """Peak resident host memory of this process and, on CUDA, peak allocated GPU memory."""
    peak = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB
    if device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _git(*args: str) -> str | None:
    """stdout of `git -C <project root> ARGS`, or None when git is missing, fails or hangs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # no GIT_DIR detours
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, env=env, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> dict:
    """The project checkout's git commit and whether tracked files differ from it (untracked
    files, e.g. records written inside the checkout, do not count); both None when the project
    is not a git checkout of its own or git is missing."""
    found = (_git("rev-parse", "--show-toplevel", "HEAD") or "").splitlines()
    if len(found) != 2 or Path(found[0]).resolve() != PROJECT_ROOT:  # not inside another repo's tree
        return {"git_commit": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": found[1], "git_dirty": None if status is None else bool(status.strip())}


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "device": str(device), "threads": torch.get_num_threads(),
           **code_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
