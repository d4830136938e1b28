"""Plots: the neuron weight-change chart and the per-epoch curves are written as real PNGs; no
matplotlib is a warning, not a crash."""
import json
import logging
import sys

import pytest

from utils.analysis.plots import main, write_plots
from utils.core.cli import log

pytest.importorskip("matplotlib")


def defense_folder(tmp_path, method="ulrl", identification=True, curves=True):
    folder = tmp_path / "r" / "defense" / method
    folder.mkdir(parents=True)
    summary = {"method": method, "record": "record/r"}
    if identification:
        summary["identification"] = {
            "scores": [10.8, 1.0, 1.4, 1.2, 2.4, 1.0, 0.7, 1.4, 1.2, 1.1], "median": 1.17,
            "threshold": 2.17, "dispersion": "mad", "outliers": [0, 4], "flagged": [0, 4]}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = ["phase,epoch,lr,loss,train_acc" + (",curve_test_acc,curve_test_asr" if curves else "")]
    for phase, epochs in (("unlearning", 2), ("relearning", 5)):
        for e in range(1, epochs + 1):
            rows.append(f"{phase},{e},0.01,1.0,0.5" + (f",0.{e}5,0.{9 - e}" if curves else ""))
    (folder / f"{method}_df.csv").write_text("\n".join(rows) + "\n")
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
