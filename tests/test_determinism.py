"""Determinism on CPU: two ULRL runs with the same seed give identical index.txt, flagged neurons,
scores, per-epoch curves, metrics and weights; another seed gives another subset.

The default test runs in-process on the tiny record (random weights, so --no_flag_action top makes
the reinitialization and the penalty part of what is compared); the slow one runs two separate
processes, with different hash seeds, on the small BadNets record at the shipped settings.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defense.ulrl import main as ulrl_main
from tests.helpers import HANG_GUARD_S, tiny_record
from tests.helpers import write_fashion_mnist
from utils.data.record import load_defense_result

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("flagged_neurons", "identification", "before", "after", "unlearning", "relearning",
            "defense_samples", "no_flag_action")


def outcome(out: Path) -> dict:
    """What a run produced that must not depend on anything but the seed."""
    summary = json.loads((out / "summary.json").read_text())
    return {"index": (out / "index.txt").read_text(), "curves": (out / "ulrl_df.csv").read_text(),
            "weights": load_defense_result(out / "defense_result.pt")["model"],
            **{key: summary[key] for key in COMPARED}}


def assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for key in a:
        if key != "weights":
            assert a[key] == b[key], key


def runs(args: list[str], out: Path, run_once, seeds=(0, 0, 1)) -> list[dict]:
    results = []
    for seed in seeds:
        shutil.rmtree(out, ignore_errors=True)
        run_once([*args, "--seed", str(seed)])
        results.append(outcome(out))
    return results


def test_same_seed_same_run_in_process(tmp_path):
    data = write_fashion_mnist(tmp_path / "data", n_train=600, n_test=100)
    record = tiny_record(tmp_path / "r")
    args = ["--result_file", "r", "--record_dir", str(tmp_path), "--dataset_path", str(data),
            "--device", "cpu", "--threads", "1", "--ratio", "0.3", "--unlearning_epochs", "2",
            "--clean_threshold", "-1", "--relearn_epochs", "1", "--no_flag_action", "top"]
    first, second, other = runs(args, record / "defense/ulrl", ulrl_main)
    assert len(first["flagged_neurons"]) == 2  # reinitialization and penalty took part
    assert_same(first, second)
    assert other["index"] != first["index"]  # the seed does reach the subset


@pytest.mark.slow
def test_same_seed_same_run_in_two_processes(small_badnet_record):
    record_dir, name = small_badnet_record
    args = ["--result_file", name, "--record_dir", str(record_dir), "--device", "cpu",
            "--yaml_path", str(ROOT / "config/defense/ulrl/fashion_mnist.yaml")]
    hash_seeds = iter(["1", "2", "3"])

    def in_a_process(argv):
        env = {**os.environ, "PYTHONHASHSEED": next(hash_seeds)}
        done = subprocess.run([sys.executable, str(ROOT / "defense/ulrl.py"), *argv], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert done.returncode == 0, done.stderr

    first, second, other = runs(args, record_dir / name / "defense/ulrl", in_a_process)
    assert 0 in [f["neuron"] for f in first["flagged_neurons"]]  # the backdoor's target class
    assert_same(first, second)
    assert other["index"] != first["index"]
