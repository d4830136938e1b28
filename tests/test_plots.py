"""Plots: the neuron weight-change chart and the per-epoch curves are written as real PNGs (the
curves: C-ACC, ASR, RA, one panel per phase on its own integer epoch axis); no matplotlib is a
warning, not a crash."""
import json
import logging
import sys

import pytest

from utils.analysis.plots import curve_figure, main, pyplot, write_plots
from utils.core.cli import log

pytest.importorskip("matplotlib")


def curve_rows(phases=(("unlearning", 2), ("relearning", 5)), prefix="curve_test_", ra=True):
    """<method>_df.csv rows as csv.DictReader gives them: strings, epochs restarting per phase."""
    rows = []
    for phase, epochs in phases:
        for e in range(1, epochs + 1):
            row = {"phase": phase, "epoch": str(e), "lr": "0.01", "loss": "1.0",
                   f"{prefix}acc": str(e / (epochs + 1)), f"{prefix}asr": str(1 - e / (epochs + 1))}
            if ra:
                row[f"{prefix}ra"] = str(e / (2 * epochs))
            rows.append(row)
    return rows


def defense_folder(tmp_path, method="ulrl", identification=True, curves=True):
    folder = tmp_path / "r" / "defense" / method
    folder.mkdir(parents=True)
    summary = {"method": method, "record": "record/r"}
    if identification:
        summary["identification"] = {
            "scores": [10.8, 1.0, 1.4, 1.2, 2.4, 1.0, 0.7, 1.4, 1.2, 1.1], "median": 1.17,
            "threshold": 2.17, "dispersion": "mad", "outliers": [0, 4], "flagged": [0, 4]}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = curve_rows() if curves else [{"phase": "finetune", "epoch": "1", "loss": "1.0"}]
    lines = [",".join(rows[0])] + [",".join(row.values()) for row in rows]
    (folder / f"{method}_df.csv").write_text("\n".join(lines) + "\n")
    return folder


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_neuron_chart_and_curves_are_written(tmp_path):
    folder = defense_folder(tmp_path)
    written = write_plots(folder)
    assert written == [folder / "neuron_changes.png", folder / "curves.png"]
    assert all(is_png(p) for p in written)
    assert not list(folder.glob(".*.tmp"))


def test_robust_chart_draws_both_rules_cuts(tmp_path, monkeypatch):
    """Robust mode flags the outliers of both rules: the chart shows the other rule's cut too."""
    from matplotlib.axes import Axes
    labels = []
    draw = Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda ax, y, **kw: labels.append(kw.get("label"))
                        or draw(ax, y, **kw))
    folder = defense_folder(tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    summary["identification"].update(rule="code", threshold_by_rule={"code": 2.17, "paper": 1.9})
    (folder / "summary.json").write_text(json.dumps(summary))
    assert is_png(write_plots(folder)[0])
    assert labels == ["median 1.17", "threshold 2.17 (MAD)", "threshold 1.9 (paper rule)"]


def test_only_what_the_files_allow_is_drawn(tmp_path):
    folder = defense_folder(tmp_path, method="ft", identification=False, curves=False)
    assert write_plots(folder) == []  # no identification block, no per-epoch evaluation


def test_command_draws_every_defense_folder_under_a_root(tmp_path):
    defense_folder(tmp_path, method="ulrl")
    defense_folder(tmp_path, method="ft", identification=False)
    assert main([str(tmp_path)]) == 0
    assert is_png(tmp_path / "r/defense/ulrl/neuron_changes.png")
    assert is_png(tmp_path / "r/defense/ft/curves.png")
    assert main([str(tmp_path / "nothing")]) == 1


@pytest.mark.parametrize("summary", [
    "{not json", "[]", '{"method": "ulrl", "identification": {}}',
    '{"method": "ulrl", "record": "r", "identification": {"scores": "10", "flagged": [0]}}',
    '{"method": "ulrl", "record": "r", "identification": {"scores": [1, 2], "flagged": 3}}',
    '{"method": "ulrl", "record": "r", "identification": {"scores": [1, 2], "flagged": [0], '
    '"median": "x", "threshold_by_rule": {"code": "y"}}}'])
def test_a_malformed_summary_is_one_line_and_the_others_are_drawn(tmp_path, capsys, summary):
    """A summary.json is a file in a record folder, so it may be planted: the command names it
    in one line, draws the other folders and exits 1, never with a traceback."""
    good = defense_folder(tmp_path)
    bad = defense_folder(tmp_path, method="ulrl_robust")
    (bad / "summary.json").write_text(summary)
    assert main([str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"{bad / 'summary.json'}: not plotted" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (good / "neuron_changes.png").is_file()


def test_missing_matplotlib_is_a_warning(tmp_path, monkeypatch):
    folder = defense_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log.addHandler(handler)
    try:
        assert write_plots(folder) == []
    finally:
        log.removeHandler(handler)
    assert any("matplotlib is not installed" in m for m in messages)
    assert not (folder / "neuron_changes.png").exists()


def shown_ticks(ax):
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


@pytest.fixture()
def plt():
    plt = pyplot()
    yield plt
    plt.close("all")


def test_curves_have_a_panel_per_phase_with_its_own_integer_epochs(plt):
    fig = curve_figure(plt, curve_rows(), "r / ulrl")
    unlearning, relearning = fig.axes
    assert [unlearning.get_title(), relearning.get_title()] == ["unlearning", "relearning"]
    for ax, epochs in ((unlearning, [1, 2]), (relearning, [1, 2, 3, 4, 5])):
        assert [line.get_label() for line in ax.get_lines()] == ["C-ACC", "ASR", "RA"]
        assert all(list(line.get_xdata()) == epochs for line in ax.get_lines())
        ticks = shown_ticks(ax)
        assert ticks and all(float(tick).is_integer() for tick in ticks)
    acc, asr, ra = relearning.get_lines()
    assert list(ra.get_ydata()) == pytest.approx([100 * e / 10 for e in range(1, 6)])  # percent
    assert unlearning.get_ylabel() == "% on the test subsample"
    assert unlearning.get_ylim() == relearning.get_ylim()  # one percent scale for all phases


def test_curves_of_one_long_phase_and_of_older_files_without_ra(plt):
    fig = curve_figure(plt, curve_rows((("finetune", 100),), prefix="test_", ra=False), "t")
    [ax] = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["C-ACC", "ASR"]
    ticks = shown_ticks(ax)
    assert 3 <= len(ticks) <= 12 and all(float(tick).is_integer() for tick in ticks)
    assert ax.get_ylabel() == "% on the full test sets"
    one = curve_figure(plt, curve_rows((("unlearning", 1), ("relearning", 1))), "t")
    assert [shown_ticks(ax) for ax in one.axes] == [[1.0], [1.0]]  # no 0.5, 1.5 around one epoch
    assert curve_figure(plt, [{"phase": "finetune", "epoch": "1", "loss": "1.0"}], "t") is None
