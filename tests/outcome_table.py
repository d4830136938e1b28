"""The table of sh/test_portability.sh: one row per (test, metric), the value under each variation,
the bound and the smallest margin (how far the worst variation is inside the bound; negative when it
fails). Reads the <variation>.jsonl files that tests/outcomes.py writes.

    python -m tests.outcome_table DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def margin(value: float, op: str, bound: float) -> float:
    return value - bound if op.startswith(">") else bound - value


def table(folder: Path) -> tuple[str, bool]:
    variations = sorted(p.stem for p in folder.glob("*.jsonl"))
    rows: dict[tuple[str, str], dict] = {}
    for variation in variations:
        seen: dict[tuple[str, str], int] = {}
        for line in (folder / f"{variation}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            key = (entry["test"], entry["metric"])
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:  # the same check again within one test: its own row
                key = (key[0], f"{key[1]} ({seen[key]})")
            row = rows.setdefault(key, {"op": entry["op"], "bound": entry["bound"], "values": {}})
            row["values"][variation] = entry["value"]
    header = ["test", "metric", *variations, "bound", "min margin"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    passed = True
    for (test, metric), row in rows.items():
        values = [row["values"].get(v) for v in variations]
        found = [v for v in values if v is not None]
        worst = min(margin(v, row["op"], row["bound"]) for v in found)
        missing = len(found) < len(variations)  # a variation did not reach this check
        passed &= worst >= 0 and not missing
        cells = ["-" if v is None else f"{v:.4g}" for v in values]
        metric = metric.replace("|", "\\|")  # a Markdown cell cannot hold a bare |
        lines.append(f"| {test.split('::')[-1]} | {metric} | " + " | ".join(cells) +
                     f" | {row['op']} {row['bound']:g} | {worst:+.4g}{' (missing)' * missing} |")
    return "\n".join(lines), passed


def main(argv: list[str]) -> int:
    text, passed = table(Path(argv[0]))
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
