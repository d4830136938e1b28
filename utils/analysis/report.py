"""Results of defense runs as tables in the ULRL paper's Table I/II layout, or one line per run.

    python -m utils.report record/                         # writes record/report.md, record/report.csv
    python -m utils.report record/ --out results/fm --defenses ft fp fst ulrl
    python -m utils.report record/*/defense/ulrl/summary.json   # one line per run
    python -m utils.report record/ --long                  # record/report.csv tidy: a row per value

Folders (a record root, one record, one defense folder) are searched for
<record>/defense/<method>/summary.json; summary.json files given by name print one line each unless
--table (--lines forces lines for folders). The tables, one per model: a row per dataset x attack
(attack, dataset and model from record/<name>/attack_summary.json when present, else the summary
and the record name), "No Defense" C-ACC and ASR (the backdoored model as the first defense of the
row measured it), then per defense (method folder; ablation variants are ulrl_<tag>) the C-ACC
change (defended minus undefended, points), the ASR, BackdoorBench's defense effectiveness rating
DER = [max(0, ASR drop) - max(0, C-ACC drop) + 1] / 2 (in %, 100 = backdoor gone at no cost,
50 = no change), and the ASR after the retuning check (--retune_check) when any run has one; an
average row per dataset (mean over the rows that have the value). All numbers of the tables are
percentages.
`--compact` puts a defense's cells in one Markdown column. `--update OLD.csv` rebuilds an earlier
table with the given runs replacing its cells (the other rows, and a rerun record's cells of the
defenses not rerun, kept as they were; averages recomputed), so rerunning one attack or one
defense does not mean rerunning the sweep; a record whose No Defense numbers changed (remade)
keeps only its fresh cells. `--complete` keeps only the records every shown defense ran on, so
that the averages of a partial sweep compare the defenses on the same records. `--metrics`
picks the cells per defense: also C-ACC after (acc), RA (ra) and the defense's wall time in seconds
without the retuning check (time). `--long` writes the CSV in tidy form instead (columns record,
dataset, model, attack, defense, metric, value, unit; one row per record, defense and metric, in
fractions as summary.json, no average rows), e.g. for pandas.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.core.io import write_csv, write_text


@dataclass
class Result:
    dataset: str
    model: str
    attack: str
    record: str
    method: str
    before: dict
    after: dict
    retune: dict | None
    summary: dict


def find_summaries(paths) -> list[Path]:
    """summary.json files given by name, and those in or under the given folders (a defense
    folder, a record, a folder of records), without walking the records' image trees."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / "summary.json").is_file():
            found.append(path / "summary.json")
        else:
            for pattern in ("*/summary.json", "defense/*/summary.json", "*/defense/*/summary.json"):
                found += [p for p in path.glob(pattern) if p.parent.parent.name == "defense"]
    return sorted(set(found))


def run_name(summary: dict) -> str:
    """The record's folder name, or the model file's name for a run without a record."""
    return Path(summary.get("record") or summary.get("model_file") or "?").name


def load_result(path: Path) -> Result:
    summary = json.loads(Path(path).read_text())
    record_folder = Path(path).parent.parent.parent  # record/<name>/defense/<method>/summary.json
    attack_file = record_folder / "attack_summary.json"
    attack = json.loads(attack_file.read_text()) if attack_file.is_file() else {}
    record = run_name(summary)
    return Result(dataset=attack.get("dataset") or summary["dataset"],
                  model=attack.get("model") or summary.get("model", "?"),
                  attack=attack.get("attack") or record, record=record, method=summary["method"],
                  before=summary["before"], after=summary["after"], retune=summary.get("retune"),
                  summary=summary)


def der_fraction(before: dict, after: dict) -> float:
    """BackdoorBench's defense effectiveness rating, as a fraction (0.5 = no change)."""
    asr_drop = before["test_asr"] - after["test_asr"]
    acc_drop = before["test_acc"] - after["test_acc"]
    return (max(0.0, asr_drop) - max(0.0, acc_drop) + 1) / 2


def der(before: dict, after: dict) -> float:
    """BackdoorBench's defense effectiveness rating, in %."""
    return 100 * der_fraction(before, after)


def result_line(summary: dict) -> str:
    b, a = summary["before"], summary["after"]
    line = f"{run_name(summary):<32} {summary['method']:<6} "
    for key, name in (("test_acc", "C-ACC"), ("test_asr", "ASR"), ("test_ra", "RA")):
        if key in b:  # a run without a trigger has C-ACC only
            line += f"{name} {100 * b[key]:6.2f} -> {100 * a[key]:6.2f}  "
    if "flagged_neurons" in summary:
        line += f"flagged {[f['neuron'] for f in summary['flagged_neurons']]}  "
    if summary.get("retune"):
        line += f"retuned ASR {100 * summary['retune']['test_asr']:6.2f}  "
    return line + f"{summary['times_s']['total']:.1f} s"


def defense_seconds(summary: dict) -> float:
    """Wall time of the defense itself: the run's total without the optional retuning check."""
    times = summary["times_s"]
    return times["total"] - times.get("retune", 0.0)


# per-defense cells: name -> (markdown header, value of a Result, or None when it has none)
METRICS = {
    "acc": ("C-ACC", lambda r: 100 * r.after["test_acc"]),
    "acc_change": ("ΔC-ACC", lambda r: 100 * (r.after["test_acc"] - r.before["test_acc"])),
    "asr": ("ASR", lambda r: 100 * r.after["test_asr"]),
    "ra": ("RA", lambda r: 100 * r.after["test_ra"]),
    "der": ("DER", lambda r: der(r.before, r.after)),
    "retune_asr": ("ASR after retune", lambda r: 100 * r.retune["test_asr"] if r.retune else None),
    "time": ("time (s)", lambda r: defense_seconds(r.summary)),
}
DEFAULT_METRICS = ("acc_change", "asr", "der", "retune_asr")


def columns(methods: list[str], metrics, results: list[Result],
            earlier: list[dict] = ()) -> list[tuple[str, str]]:
    """(csv name, markdown header) of every column; a metric no run of a defense has (nor an
    earlier row) is left out (the retuning check when it did not run)."""
    cols = [("dataset", "Dataset"), ("attack", "Attack"), ("record", "Record"),
            ("no_defense_acc", "No Defense C-ACC"), ("no_defense_asr", "No Defense ASR")]
    for m in methods:
        runs = [r for r in results if r.method == m]
        cols += [(f"{m}_{k}", f"{m} {METRICS[k][0]}") for k in metrics
                 if any(METRICS[k][1](r) is not None for r in runs)
                 or any(f"{m}_{k}" in row for row in earlier)]
    return cols


TEXT_COLUMNS = ("model", "dataset", "attack", "record")


def methods_of(rows: list[dict]) -> set[str]:
    """The defenses that have cells ('<method>_<metric>' columns) in earlier report rows."""
    suffixes = sorted(METRICS, key=len, reverse=True)  # 'acc_change' is tried before 'acc'
    found = set()
    for key in {k for row in rows for k in row} - set(TEXT_COLUMNS):
        metric = next((m for m in suffixes if key.endswith(f"_{m}")), None)
        if metric and not key.startswith("no_defense_"):
            found.add(key[:-len(metric) - 1])
    return found


def earlier_rows(path) -> list[dict]:
    """The per-record rows of an earlier report CSV (its averages are recomputed, not kept)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("attack") != "Average"]
    return [{k: v if k in TEXT_COLUMNS else float(v) for k, v in row.items() if v != ""}
            for row in rows]


def kept_cells(old: dict | None, fresh: dict, rerun: set[str]) -> dict:
    """The earlier row's cells of the defenses not rerun on this record, when its No Defense
    numbers agree with the fresh runs' to 0.01 points (the same backdoored model); a record made
    anew keeps none of them."""
    if old is None:
        return {}
    same = all(abs(old.get(k, float("nan")) - fresh[k]) <= 0.01
               for k in ("no_defense_acc", "no_defense_asr"))
    stale = sorted(methods_of([old]) - rerun)
    if not same:
        if stale:
            print(f"{fresh['record']}: its No Defense C-ACC / ASR differ from the earlier table's "
                  f"(a remade record), so its earlier cells of {', '.join(stale)} are dropped",
                  file=sys.stderr)
        return {}
    return {k: v for k, v in old.items() if k not in TEXT_COLUMNS and k in
            {f"{m}_{metric}" for m in stale for metric in METRICS}}


def table_rows(results: list[Result], methods: list[str], metrics,
               earlier: list[dict] = (), complete: bool = False) -> list[dict]:
    """One row per record (sorted by dataset, attack, record), with the `earlier` rows of the
    records that have no result here, the earlier cells of defenses not rerun (kept_cells), and
    an average row per dataset; `complete`: only the records every defense ran on, so that the
    averages compare the defenses on the same records."""
    by_record: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_record.setdefault((r.dataset, r.attack, r.record), {})[r.method] = r
    fresh = {key[2] for key in by_record}
    rows = [{k: v for k, v in row.items() if k != "model"} for row in earlier
            if row["record"] not in fresh]
    old_rows = {row["record"]: row for row in earlier if row["record"] in fresh}
    for (dataset, attack, record), runs in by_record.items():
        first = runs[sorted(runs)[0]]
        row = {"dataset": dataset, "attack": attack, "record": record,
               "no_defense_acc": 100 * first.before["test_acc"],
               "no_defense_asr": 100 * first.before["test_asr"]}
        row.update(kept_cells(old_rows.get(record), row, set(runs)))
        for m in methods:
            if m in runs:
                for k in metrics:
                    value = METRICS[k][1](runs[m])
                    if value is not None:
                        row[f"{m}_{k}"] = value
        rows.append(row)
    if complete:
        rows = [row for row in rows
                if all(any(f"{m}_{k}" in row for k in metrics) for m in methods)]
    datasets = {}
    for row in sorted(rows, key=lambda row: (row["dataset"], row["attack"], row["record"])):
        datasets.setdefault(row["dataset"], []).append(row)
    out = []
    for dataset, group in datasets.items():
        out += group
        average = {"dataset": dataset, "attack": "Average", "record": ""}
        for key in {k for row in group for k in row} - set(average):
            values = [row[key] for row in group if key in row]
            average[key] = sum(values) / len(values)
        out.append(average)
    return out


def fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key.endswith("_acc_change"):
            return f"{value:+.2f}"
        return f"{value:.1f}" if key.endswith("_time") else f"{value:.2f}"
    return "" if value is None else str(value)


def markdown(title: str, cols: list[tuple], rows: list[dict]) -> str:
    """A Markdown table; a column is (csv name, header) or, compact, (tuple of csv names, header)
    with its values joined by ' / '."""
    def cell(row, keys):
        keys = keys if isinstance(keys, tuple) else (keys,)
        return " / ".join(fmt(k, row[k]) if k in row else "–" for k in keys)
    lines = [f"### {title}", "", "| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---" if k in ("dataset", "attack", "record") else "---:"
                            for k, _ in cols) + "|"]
    shown = None
    for row in rows:
        cells = [cell(row, k) for k, _ in cols]
        if row["dataset"] == shown:  # the dataset once per group, as the paper's tables
            cells[0] = ""
        shown = row["dataset"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compact_columns(cols: list[tuple[str, str]], methods: list[str], metrics) -> list[tuple]:
    """One column per defense holding all its metrics (the paper's tables put C-ACC and ASR of a
    defense side by side; here in one cell, so that seven defenses fit a page)."""
    present = {k for k, _ in cols}
    out = [c for c in cols if c[0] in ("dataset", "attack", "record")]
    out.append((("no_defense_acc", "no_defense_asr"), "No Defense C-ACC / ASR"))
    for m in methods:
        keys = tuple(f"{m}_{k}" for k in metrics if f"{m}_{k}" in present)
        if keys:
            names = " / ".join(METRICS[k][0] for k in metrics if f"{m}_{k}" in present)
            out.append((keys, f"{m} {names}"))
    return out


def build_tables(results: list[Result], defenses: list[str] | None = None,
                 metrics=DEFAULT_METRICS, compact: bool = False,
                 earlier: list[dict] = (), complete: bool = False) -> tuple[str, list]:
    """(Markdown of one table per model, CSV rows of all tables with a 'model' column); rows of
    an `earlier` table are kept for the records without a result here."""
    methods = defenses or sorted({r.method for r in results} | methods_of(earlier))
    results = [r for r in results if r.method in methods]
    md_parts, csv_rows = [], []
    for model in sorted({r.model for r in results} | {row["model"] for row in earlier}):
        mine = [r for r in results if r.model == model]
        kept = [row for row in earlier if row["model"] == model]
        present = [m for m in methods
                   if any(r.method == m for r in mine) or m in methods_of(kept)]
        cols = columns(present, metrics, mine, kept)
        rows = table_rows(mine, present, metrics, kept, complete)
        shown = compact_columns(cols, present, metrics) if compact else cols
        md_parts.append(markdown(f"{model}: percentages; ΔC-ACC in points", shown, rows))
        csv_rows += [{"model": model, **{k: round(row[k], 4) if isinstance(row.get(k), float)
                                         else row.get(k, "") for k, _ in cols}} for row in rows]
    return "\n".join(md_parts), csv_rows


RATES = ("test_acc", "test_asr", "test_ra")


def long_rows(results: list[Result]) -> list[dict]:
    """The tidy form: one row per (record, defense, metric), values as summary.json has them
    (fractions; the C-ACC change and DER too; time in seconds) and no average rows."""
    rows = []
    for r in sorted(results, key=lambda r: (r.model, r.dataset, r.attack, r.record, r.method)):
        values = {f"{stage}_{k}": rates[k] for stage, rates in (("before", r.before),
                                                                  ("after", r.after))
                  for k in RATES if k in rates}
        values["acc_change"] = r.after["test_acc"] - r.before["test_acc"]
        values["der"] = der_fraction(r.before, r.after)
        values.update({f"retune_{k}": r.retune[k] for k in RATES if k in (r.retune or {})})
        values["time_s"] = defense_seconds(r.summary)
        for metric, value in values.items():
            unit = "s" if metric == "time_s" else "fraction"
            rows.append({"record": r.record, "dataset": r.dataset, "model": r.model,
                         "attack": r.attack, "defense": r.method, "metric": metric,
                         "value": round(value, 3 if unit == "s" else 6), "unit": unit})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="folders or summary.json files")
    parser.add_argument("--out", help="write OUT.md and OUT.csv (default: <first folder>/report)")
    parser.add_argument("--defenses", nargs="+", help="defense columns, in this order "
                        "(default: every method found, alphabetically)")
    parser.add_argument("--metrics", nargs="+", choices=list(METRICS), default=DEFAULT_METRICS,
                        help="cells per defense, in this order (default: %(default)s); acc = "
                             "C-ACC after, ra = robust accuracy, time = the defense's seconds "
                             "(without the retuning check)")
    parser.add_argument("--compact", action="store_true",
                        help="Markdown: one column per defense with its metrics joined by ' / ' "
                             "(the CSV keeps one column per value)")
    parser.add_argument("--complete", action="store_true",
                        help="only the records every shown defense ran on (averages over the "
                             "same records)")
    parser.add_argument("--update", metavar="OLD.csv",
                        help="an earlier report's CSV: its rows of records without a result here "
                             "are kept, and a rerun record's cells of the defenses not rerun (when "
                             "its No Defense numbers agree); the averages recomputed")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lines", action="store_true", help="one line per run")
    mode.add_argument("--table", action="store_true", help="tables, also for summary.json files")
    mode.add_argument("--long", action="store_true",
                      help="OUT.csv in tidy form: one row per record, defense and metric "
                           "(before/after C-ACC, ASR, RA, C-ACC change, DER, retune, time), "
                           "fractions, no average rows (those stay in OUT.md)")
    args = parser.parse_args(argv)
    if args.long and args.update:
        parser.error("--update rebuilds a wide report CSV; it does not combine with --long")

    folders = [p for p in args.paths if Path(p).is_dir()]
    results = []
    for path in find_summaries(args.paths):
        try:
            results.append(load_result(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"{path}: no readable result ({e})", file=sys.stderr)
    if not results:
        print(f"no defense results (defense/<method>/summary.json) in {' '.join(args.paths)}",
              file=sys.stderr)
        return 1
    if args.lines or not (folders or args.table or args.long):
        for r in results:
            print(result_line(r.summary))
        return 0
    without_asr = [r for r in results if "test_asr" not in r.before]
    for r in without_asr:
        print(f"{r.record}/{r.method}: no ASR (a run without a trigger), left out of the tables",
              file=sys.stderr)
    results = [r for r in results if r not in without_asr]
    if not results:
        return 1
    earlier = earlier_rows(args.update) if args.update else []
    text, rows = build_tables(results, args.defenses, args.metrics, args.compact, earlier,
                              args.complete)
    out = args.out or str(Path(folders[0] if folders else ".") / "report")
    write_text(f"{out}.md", text)
    if args.long:
        rows = long_rows([r for r in results if not args.defenses or r.method in args.defenses])
    write_csv(f"{out}.csv", rows)
    print(text)
    print(f"written {out}.md and {out}.csv" + (" (long form)" if args.long else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
