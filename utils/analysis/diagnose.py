"""Why ULRL left a backdoor in: one Markdown row per ULRL run (every identification rule) of the
records under a folder, from each record's defense/ulrl*/summary.json and attack_summary.json.

    python -m utils.diagnose /work/records_w16 --out results/fm_w16/diagnosis.md

Per run: ASR before and after, the flagged neurons, the target's rank among the neuron scores
(1 = moved most), the three largest scores, the median and threshold, where the unlearned model
sends the defense images (a "sink" class collecting them tends to move most), the cosine of the
flagged rows to their originals after relearning, and whether unlearning reached CA_min. A run
whose ASR after is above --fail_asr (%) is a failure and gets a one-paragraph reading of its
numbers. Only reads JSON: no record, model or data is loaded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.core.io import write_text

FAIL_ASR = 10.0  # % ASR after ULRL above which a run counts as a failure (issue 16)


def find_runs(root: Path) -> list[Path]:
    """Every defense/ulrl*/summary.json under `root` (a record folder or a folder of records)."""
    patterns = ("defense/ulrl*/summary.json", "*/defense/ulrl*/summary.json")
    return sorted({p for pattern in patterns for p in root.glob(pattern)})


def attack_summary(record: Path) -> dict:
    path = record / "attack_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def target_of(attack: dict, summary: dict) -> int | None:
    """The backdoor's target class: attack_summary.json's config.attack_target, else the
    defense's resolved config (target_label), else unknown."""
    for target in (attack.get("config", {}).get("attack_target"),
                   summary.get("config", {}).get("target_label")):
        if isinstance(target, int):
            return target
    return None


def diagnose_run(path: Path) -> dict:
    """The numbers of one ULRL run that explain its outcome."""
    summary = json.loads(path.read_text())
    record = path.parent.parent.parent  # <record>/defense/<method>/summary.json
    ident = summary.get("identification", {})
    scores = ident.get("scores", [])
    # by score, not the summary's ranking: the paper rule ranks by |deviation| (low movers too)
    ranking = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    attack = attack_summary(record)
    target = target_of(attack, summary)
    unlearning, relearning = summary.get("unlearning", {}), summary.get("relearning", {})
    predictions = unlearning.get("predictions_per_class")
    sink = max(range(len(predictions)), key=lambda c: predictions[c]) if predictions else None
    return {
        "record": record.name,
        "attack": attack.get("attack") or record.name.split("_")[0],
        "run": path.parent.name,
        "rule": ident.get("rule", summary.get("config", {}).get("flag_rule", "code")),
        "target": target,
        "asr_before": 100 * summary["before"]["test_asr"],
        "asr_after": 100 * summary["after"]["test_asr"],
        "acc_change": 100 * (summary["after"]["test_acc"] - summary["before"]["test_acc"]),
        "flagged": [n["neuron"] for n in summary.get("flagged_neurons", [])],
        "no_flag_action": summary.get("no_flag_action"),
        "target_rank": ranking.index(target) + 1 if target in ranking else None,
        "neurons": len(scores),
        "top3": [(j, scores[j]) for j in ranking[:3]],
        "median": ident.get("median"),
        "threshold": ident.get("threshold"),
        "predictions": predictions,
        "sink": sink,
        "sink_share": 100 * predictions[sink] / sum(predictions) if predictions else None,
        "final_cosine": relearning.get("final_cosine"),
        "alpha": summary.get("alpha_choice", {}).get("alpha",
                                                     summary.get("config", {}).get("alpha")),
        "alpha_chosen": "alpha_choice" in summary,
        "reached_ca_min": unlearning.get("reached_threshold"),
        "unlearning_epochs": unlearning.get("epochs"),
    }


def explain(row: dict) -> str:
    """One paragraph in words: what the numbers of a failed run show."""
    parts = []
    target, rank = row["target"], row["target_rank"]
    if rank is None:
        parts.append("the target class is unknown or has no score")
    elif rank == 1:
        parts.append(f"the target {target} moves most (rank 1)")
    else:
        top = row["top3"][0]
        parts.append(f"the target {target} ranks {rank} of {row['neurons']}; "
                     f"neuron {top[0]} moves most ({top[1]:.3g})")
    flagged = row["flagged"]
    if not flagged:
        parts.append(f"nothing is flagged (relearning: {row['no_flag_action'] or 'none'})")
    elif target in flagged:
        others = [n for n in flagged if n != target]
        parts.append("the target is flagged" + (f" (with {others})" if others else " alone")
                     + ", yet the backdoor survives relearning")
    else:
        parts.append(f"flagged {flagged}, not the target")
    if row["sink"] is not None:
        parts.append(f"class {row['sink']} collects {row['sink_share']:.0f} % of the unlearned "
                     "model's predictions on the defense data"
                     + (" (the target itself)" if row["sink"] == target else ""))
    if row["reached_ca_min"] is False:
        parts.append(f"unlearning stopped after {row['unlearning_epochs']} epochs without "
                     "reaching CA_min")
    if row["final_cosine"] is not None and flagged:
        parts.append(f"the flagged rows end at cosine {row['final_cosine']:.2f} to their originals"
                     + (f" (alpha {row['alpha']:g}" + (", chosen by cross-validation)"
                                                       if row["alpha_chosen"] else ")")
                        if row["alpha"] is not None else ""))
    return "; ".join(parts) + "."


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], fail_asr: float) -> str:
    header = ("| attack | run | rule | ASR before | ASR after | ΔC-ACC | flagged | target (rank) "
              "| top-3 neurons (score) | median | threshold | unlearned predictions per class "
              "| final cosine | CA_min reached |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        top3 = ", ".join(f"{j} ({s:.3g})" for j, s in r["top3"])
        lines.append(
            f"| {r['attack']} | {r['run']} | {r['rule']} | {fmt(r['asr_before'])} | {fmt(r['asr_after'])} "
            f"| {fmt(r['acc_change'], '+.2f')} | {r['flagged'] or 'none'} "
            f"| {r['target']} ({fmt(r['target_rank'], 'd')}) | {top3} | {fmt(r['median'], '.3g')} "
            f"| {fmt(r['threshold'], '.3g')} | {r['predictions'] or '-'} "
            f"| {fmt(r['final_cosine'])} | {fmt(r['reached_ca_min'], '')} |")
    failures = [r for r in rows if r["asr_after"] > fail_asr]
    lines += ["", f"Failures (ASR after > {fail_asr:g} %): {len(failures)} of {len(rows)} runs.", ""]
    for r in failures:
        lines += [f"**{r['attack']}, {r['run']} (rule {r['rule']})** (ASR {r['asr_before']:.2f} -> "
                  f"{r['asr_after']:.2f} %): {explain(r)}", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="record folders or folders of records")
    parser.add_argument("--out", help="write the Markdown here (default: print it)")
    parser.add_argument("--fail_asr", type=float, default=FAIL_ASR,
                        help=f"ASR after (%%) above which a run is a failure (default {FAIL_ASR:g})")
    args = parser.parse_args(argv)
    runs = [p for root in args.paths for p in find_runs(Path(root))]
    if not runs:
        parser.error(f"no defense/ulrl*/summary.json under {' '.join(args.paths)}")
    rows = sorted((diagnose_run(p) for p in runs), key=lambda r: (r["attack"], r["run"]))
    text = markdown(rows, args.fail_asr) + "\n"
    if args.out:
        write_text(args.out, text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
