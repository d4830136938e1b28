"""Bounds on what training produces (ASR, C-ACC, RA, flagged neurons), held on any machine.

Float results differ between CPU kinds, thread counts and library versions, so a training outcome
is only asserted with a margin measured over variations: seeds 0, 1, 2 (ULRL_TEST_SEED, passed by
the outcome tests to every attack and defense they run) times one and two torch threads (the
process's CPU affinity, e.g. `taskset -c 0`). `bash sh/test_portability.sh` runs the tests marked
`outcome` under all six and prints each bound with its values and smallest margin; every bound
states the measured spread next to it.

With ULRL_OUTCOME_LOG set, every checked value is appended to that file (one JSON object per
line) instead of asserted, so that one run measures every bound of a test, also the ones after a
value that misses; the table of sh/test_portability.sh then judges them all.
"""
from __future__ import annotations

import json
import os
import operator

SEED = int(os.environ.get("ULRL_TEST_SEED", "0"))

_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def seed_args() -> list[str]:
    """The seed option for an attack or defense run inside an outcome test."""
    return ["--seed", str(SEED)]


def check(metric: str, value: float, op: str, bound: float) -> None:
    """Assert `value op bound` for an outcome of training (logged instead, see module doc)."""
    value = float(value)
    log = os.environ.get("ULRL_OUTCOME_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "metric": metric, "value": value, "op": op,
                                "bound": bound}) + "\n")
        return
    assert _COMPARE[op](value, bound), f"{metric} = {value:.4f}, the bound is {op} {bound}"
