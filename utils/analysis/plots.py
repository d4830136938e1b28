"""PNG charts of a defense run, written into its folder (record/<name>/defense/<method>/):

- neuron_changes.png: the weight change of every classifier neuron during unlearning, with the
  median and threshold lines and the flagged neurons marked (the ULRL paper's Fig. 3); drawn when
  summary.json has an "identification" block (ULRL);
- curves.png: C-ACC and ASR after every epoch of every phase, from <method>_df.csv, when the run
  evaluated per epoch (--eval_every_epoch: full test sets; --curve_samples: a fixed subsample).

    python -m utils.plots record/                          # every defense folder under record/
    python -m utils.plots record/badnet_0_1/defense/ulrl   # one folder

ULRL draws them itself (--plots, on by default); this command draws them for any defense afterwards.
matplotlib is optional: without it a warning is logged and nothing is drawn.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from utils.analysis.report import find_summaries
from utils.core.cli import log, setup_console_logging
from utils.core.io import write_bytes

CURVE_COLUMNS = (("test_acc", "test_asr", "full test sets"),
                 ("curve_test_acc", "curve_test_asr", "test subsample"))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning) when missing."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed, so no plots were drawn (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, png.getvalue())  # atomic, like every other output
    return path


def neuron_chart(plt, found: dict, title: str, path: Path) -> Path:
    """Bars of the per-neuron weight change; flagged neurons red, outliers over the ht cap orange."""
    scores, flagged = found["scores"], set(found["flagged"])
    outliers = set(found["outliers"])
    colors = ["tab:red" if j in flagged else "tab:orange" if j in outliers else "tab:gray"
              for j in range(len(scores))]
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.35 * len(scores), 16.0)), 4.0))
    ax.bar(range(len(scores)), scores, color=colors)
    ax.axhline(found["median"], color="black", linestyle="--", linewidth=1,
               label=f"median {found['median']:.3g}")
    scale = found.get("dispersion", "mad").upper()
    ax.axhline(found["threshold"], color="tab:red", linestyle=":", linewidth=1.5,
               label=f"threshold {found['threshold']:.3g} ({scale})")
    for j in sorted(flagged):
        ax.annotate(f"{j}: {scores[j]:.3g}", (j, scores[j]), ha="center", va="bottom", fontsize=8)
    if len(scores) <= 20:
        ax.set_xticks(range(len(scores)))
    ax.set_xlabel("classifier neuron (class)")
    ax.set_ylabel("sum |w_post - w_pre|")
    ax.set_title(title, fontsize=10)
    ax.legend(title=f"flagged {sorted(flagged)}", fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def curve_chart(plt, rows: list[dict], title: str, path: Path) -> Path | None:
    """C-ACC and ASR (percent) per epoch over all phases, a dotted line between phases."""
    for acc_key, asr_key, source in CURVE_COLUMNS:
        points = [(row.get("phase", ""), float(row[acc_key]), float(row[asr_key]))
                  for row in rows if row.get(acc_key) not in (None, "")]
        if points:
            break
    else:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    start = 0
    for end in range(1, len(points) + 1):  # one segment per phase: each phase restarts the model
        if end < len(points) and points[end][0] == points[start][0]:
            continue
        x = range(start + 1, end + 1)
        first = start == 0
        ax.plot(x, [100 * p[1] for p in points[start:end]], "o-", color="tab:blue", markersize=3,
                label="C-ACC" if first else None)
        ax.plot(x, [100 * p[2] for p in points[start:end]], "o-", color="tab:orange",
                markersize=3, label="ASR" if first else None)
        ax.text((start + end + 1) / 2, 103, points[start][0], ha="center", fontsize=8)
        if end < len(points):
            ax.axvline(end + 0.5, color="gray", linestyle=":")
        start = end
    ax.set_ylim(-3, 108)
    ax.set_xlabel("epoch (all phases in order)")
    ax.set_ylabel("% on the " + source)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def write_plots(folder, summary: dict | None = None) -> list[Path]:
    """Draw what a defense folder's files allow (`summary`: its summary.json, read when not
    given); returns the PNGs written."""
    folder = Path(folder)
    summary = summary or json.loads((folder / "summary.json").read_text())
    plt = pyplot()
    if plt is None:
        return []
    method = summary["method"]
    title = f"{Path(summary['record']).name} / {method}"
    written = []
    if "identification" in summary:
        written.append(neuron_chart(plt, summary["identification"],
                                    f"{title}: weight change per classifier neuron",
                                    folder / "neuron_changes.png"))
    table = folder / f"{method}_df.csv"
    if table.is_file():
        with table.open(newline="") as f:
            curves = curve_chart(plt, list(csv.DictReader(f)), f"{title}: per-epoch metrics",
                                 folder / "curves.png")
        written += [curves] if curves else []
    for path in written:
        log.info("plot %s", path)
    return written


def main(argv=None) -> int:
    setup_console_logging()
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    folders = [summary.parent for summary in find_summaries(paths)]
    if not folders:
        print(f"no defense results (defense/<method>/summary.json) under {' '.join(map(str, paths))}",
              file=sys.stderr)
        return 1
    for folder in folders:
        write_plots(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
