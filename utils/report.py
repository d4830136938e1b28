"""Before/after table of defense results: python -m utils.report record/*/defense/*/summary.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def result_line(summary: dict) -> str:
    b, a = summary["before"], summary["after"]
    flagged = [f["neuron"] for f in summary.get("flagged_neurons", [])]
    return (f"{Path(summary['record']).name:<32} {summary['method']:<6} "
            f"C-ACC {100 * b['test_acc']:6.2f} -> {100 * a['test_acc']:6.2f}  "
            f"ASR {100 * b['test_asr']:6.2f} -> {100 * a['test_asr']:6.2f}  "
            f"RA {100 * b['test_ra']:6.2f} -> {100 * a['test_ra']:6.2f}  "
            f"flagged {flagged}  {summary['times_s']['total']:.1f} s")


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        try:
            print(result_line(json.loads(Path(path).read_text())))
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: no readable result ({e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
