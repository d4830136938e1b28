"""What sh/sweep.sh asks of a record before it runs a defense on it, as checks in Python:

    python -m utils.sweep_tools record-info RECORD_FOLDER     # "dataset model", both registered
    python -m utils.sweep_tools done SUMMARY_JSON             # exit 0: a sealed, complete result
    python -m utils.sweep_tools prepare-log RECORD_FOLDER NAME  # defense/NAME, created safely

A record's strings pick a config file in the sweep, so they must be registered names, never paths;
a record can ship its own defense/<method>/summary.json, so only a result this user's runs sealed
counts as done (utils/core/result_set.py); and the sweep's per-run log is created below the record
folder without following a link the record planted. Each refusal is one line on stderr, exit 2.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from utils.core.errors import UserError, shown
from utils.core.result_set import create_file_below, open_folder, verify_summary

SUMMARY_MAX_BYTES = 64 * 1024


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def record_info(folder: Path) -> tuple[str, str]:
    """(dataset, model) from attack_summary.json, else attack_result.pt; both must be registered."""
    from models import model_names
    from utils.data.datasets import dataset_names
    summary = folder / "attack_summary.json"
    try:
        if not stat.S_ISREG(os.lstat(summary).st_mode) or \
                os.lstat(summary).st_size > SUMMARY_MAX_BYTES:
            raise ValueError("not a small regular file")
        info = json.loads(summary.read_text())
        dataset, model = info["dataset"], info["model"]
    except (OSError, ValueError, KeyError, TypeError):
        from utils.data.record import load_attack_record  # the safe loader
        record = load_attack_record(folder)
        dataset, model = record.clean_data, record.model_name
    require(dataset in dataset_names(), f"record {folder}: dataset {shown(repr(dataset), 80)} is "
            f"not a registered data set ({', '.join(dataset_names())}); the record is damaged or "
            "malicious")
    require(model in model_names(), f"record {folder}: model {shown(repr(model), 80)} is not a "
            f"registered model ({', '.join(model_names())}); the record is damaged or malicious")
    return dataset, model


def prepare_log(folder: Path, name: str) -> None:
    """folder/defense/name as an empty regular file of its own, reached without links."""
    require("/" not in name and name not in ("", ".", ".."), f"bad log name {shown(name)}")
    log = folder / "defense" / name
    directory = open_folder(folder, ["defense"], create=True)
    try:
        fd = create_file_below(directory, name, os.O_WRONLY, 0o644, log,
                               f"cannot write {log} ({{reason}})")
    finally:
        os.close(directory)
    try:
        info = os.fstat(fd)
        # a hard link would let truncating this file truncate another one
        require(stat.S_ISREG(info.st_mode) and info.st_nlink == 1,
                f"{log} is not a plain file of its own (a hard link or a "
                "device, which a record can ship): remove it, then rerun")
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "record-info" and len(args) == 1:
        print(*record_info(Path(args[0])))
    elif command == "done" and len(args) == 1:
        reason = verify_summary(args[0])
        if reason:
            print(reason)
            sys.exit(1)
    elif command == "prepare-log" and len(args) == 2:
        prepare_log(Path(args[0]), args[1])
    else:
        raise UserError("usage: python -m utils.sweep_tools record-info FOLDER | done SUMMARY | "
                        "prepare-log FOLDER NAME")


if __name__ == "__main__":
    # Not utils.core.cli.main_guard: that imports torch, a second per call that `done` and
    # `prepare-log` do not need. Their only expected failure is a UserError.
    try:
        main()
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
