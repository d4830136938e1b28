"""ULRL's reporting when nothing is flagged: never a silent fallback to fine-tuning."""
import json

import pytest

from defense.ulrl import main
from tests.helpers import tiny_record


@pytest.mark.parametrize("action", ["stop", "top", "finetune"])
def test_no_flagged_neuron_is_reported_and_handled(tmp_path, action):
    tiny_record(tmp_path / "r")
    main(["--result_file", "r", "--record_dir", str(tmp_path), "--ratio", "0.002", "--tau", "1e9",
          "--unlearning_epochs", "1", "--relearn_epochs", "1", "--no_flag_action", action])
    out = tmp_path / "r/defense/ulrl"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identification"]["outliers"] == []
    assert summary["no_flag_action"] == action
    sources = summary["config_sources"]  # beside the values, which stay as they were
    assert sources["tau"] == "command line" and sources["relearn_momentum"] == "default"
    assert sources["alpha"].endswith("fashion_mnist.yaml (picked for fashion_mnist/smallcnn)")
    assert summary["config"]["tau"] == 1e9 and set(sources) == set(summary["config"])
    assert "no neuron was flagged" in (out / "ulrl.log").read_text()
    flagged = [f["neuron"] for f in summary["flagged_neurons"]]
    if action == "stop":  # the original model is kept as it is
        assert summary["after"] == summary["before"] and summary["relearning"]["epochs"] == 0
        assert flagged == []
    elif action == "top":  # the ht largest scores are reinitialized anyway
        scores = summary["identification"]["scores"]
        assert flagged == sorted(range(10), key=lambda j: -scores[j])[:2]
    else:
        assert flagged == [] and summary["relearning"]["epochs"] == 1


def test_per_epoch_curves_are_written_and_do_not_change_the_result(tmp_path):
    tiny_record(tmp_path / "r")
    base = ["--result_file", "r", "--record_dir", str(tmp_path), "--ratio", "0.002",
            "--unlearning_epochs", "2", "--relearn_epochs", "2", "--no_flag_action", "top"]
    out = tmp_path / "r/defense/ulrl"
    main(base)
    plain = json.loads((out / "summary.json").read_text())
    main([*base, "--curve_samples", "3"])
    curves = json.loads((out / "summary.json").read_text())
    assert curves["after"] == plain["after"]  # evaluating a subsample touches no training state
    header, *rows = (out / "ulrl_df.csv").read_text().splitlines()
    assert {"curve_test_acc", "curve_test_asr", "curve_test_ra"} <= set(header.split(","))
    assert len(rows) == curves["unlearning"]["epochs"] + 2
