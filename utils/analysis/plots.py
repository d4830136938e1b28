"""PNG charts of a defense run, written into its folder (record/<name>/defense/<method>/):

- neuron_changes.png: the weight change of every classifier neuron during unlearning, with the
  median and threshold lines and the flagged neurons marked (the ULRL paper's Fig. 3); drawn when
  summary.json has an "identification" block (ULRL);
- curves.png: C-ACC, ASR and RA after every epoch, one panel per phase with that phase's own epoch
  axis, from <method>_df.csv, when the run evaluated per epoch (--eval_every_epoch: full test sets;
  --curve_samples: a fixed subsample).

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

from utils.analysis.report import find_summaries, run_name
from utils.core.cli import log, setup_console_logging
from utils.core.io import write_bytes

# <method>_df.csv column prefixes of per-epoch metrics, and what they were measured on
CURVE_SOURCES = (("test_", "full test sets"), ("curve_test_", "test subsample"))
CURVE_LINES = (("acc", "C-ACC", "tab:blue"), ("asr", "ASR", "tab:orange"), ("ra", "RA", "tab:green"))


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
    outliers = set(found.get("outliers", []))  # robust mode flags sinks: no threshold
    colors = ["tab:red" if j in flagged else "tab:orange" if j in outliers else "tab:gray"
              for j in range(len(scores))]
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.35 * len(scores), 16.0)), 4.0))
    ax.bar(range(len(scores)), scores, color=colors)
    if "threshold" in found:
        ax.axhline(found["median"], color="black", linestyle="--", linewidth=1,
                   label=f"median {found['median']:.3g}")
        scale = found.get("dispersion", "mad").upper()
        ax.axhline(found["threshold"], color="tab:red", linestyle=":", linewidth=1.5,
                   label=f"threshold {found['threshold']:.3g} ({scale})")
    for rule, cut in found.get("threshold_by_rule", {}).items():  # robust mode: both rules flag
        if rule != found.get("rule"):
            ax.axhline(cut, color="tab:purple", linestyle="-.", linewidth=1.2,
                       label=f"threshold {cut:.3g} ({rule} rule)")
    for j in sorted(flagged):
        ax.annotate(f"{j}: {scores[j]:.3g}", (j, scores[j]), ha="center", va="bottom", fontsize=8)
    if len(scores) <= 20:
        ax.set_xticks(range(len(scores)))
    ax.set_xlabel("classifier neuron (class)")
    ax.set_ylabel("sum |w_post - w_pre|")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=ax.get_legend_handles_labels()[0], title=f"flagged {sorted(flagged)}",
              fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def phase_curves(rows: list[dict]) -> tuple[list[tuple[str, list[dict]]], str] | None:
    """The rows that carry per-epoch metrics as (phase, rows) runs in file order (each phase
    restarts training, so each gets its own axis) and what they were measured on; None without."""
    for prefix, source in CURVE_SOURCES:
        measured = [row for row in rows if row.get(f"{prefix}acc") not in (None, "")]
        if measured:
            break
    else:
        return None
    runs: list[tuple[str, list[dict]]] = []
    for row in measured:
        phase = row.get("phase") or ""
        if not runs or runs[-1][0] != phase:
            runs.append((phase, []))
        runs[-1][1].append({"epoch": int(row.get("epoch") or len(runs[-1][1]) + 1),
                            **{key: float(row[f"{prefix}{key}"]) for key, _, _ in CURVE_LINES
                               if row.get(f"{prefix}{key}") not in (None, "")}})
    return runs, source


def curve_figure(plt, rows: list[dict], title: str):
    """C-ACC, ASR and RA (percent) per epoch: one panel per phase, its own integer epoch axis, a
    shared percent axis; None when the rows have no per-epoch metrics."""
    from matplotlib.ticker import MaxNLocator
    found = phase_curves(rows)
    if found is None:
        return None
    runs, source = found
    fig, axes = plt.subplots(1, len(runs), sharey=True, squeeze=False,
                             figsize=(max(7.0, 3.0 * len(runs)), 4.0),
                             gridspec_kw={"width_ratios": [max(3, len(points)) for _, points in runs]})
    for ax, (phase, points) in zip(axes[0], runs):
        epochs = [p["epoch"] for p in points]
        for key, label, color in CURVE_LINES:
            if all(key in p for p in points):
                ax.plot(epochs, [100 * p[key] for p in points], "o-", color=color, markersize=3,
                        label=label)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(phase or "training", fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylim(-3, 103)
    axes[0][0].set_ylabel("% on the " + source)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def curve_chart(plt, rows: list[dict], title: str, path: Path) -> Path | None:
    fig = curve_figure(plt, rows, title)
    return None if fig is None else _save(plt, fig, path)


def write_plots(folder, summary: dict | None = None) -> list[Path]:
    """Draw what a defense folder's files allow (`summary`: its summary.json, read when not
    given); returns the PNGs written."""
    folder = Path(folder)
    summary = summary or json.loads((folder / "summary.json").read_text())
    plt = pyplot()
    if plt is None:
        return []
    method = summary["method"]
    title = f"{run_name(summary)} / {method}"
    written = []
    if "identification" in summary:
        written.append(neuron_chart(plt, summary["identification"],
                                    f"{title}\nweight change per classifier neuron",
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
    failed = 0
    for folder in folders:
        try:
            write_plots(folder)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            # summaries are files in record folders, so possibly planted: one line, go on
            print(f"{folder / 'summary.json'}: not plotted, not a summary this tool wrote "
                  f"({type(e).__name__}: {e}); rerun the defense to rewrite it", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
