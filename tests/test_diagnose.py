"""utils/analysis/diagnose.py on hand-made summary.json files: a run that works and one where a
sink class outmoves the target."""
import json

from utils.analysis.diagnose import diagnose_run, main


def make_run(root, record, tag, target, scores, flagged, asr_after, predictions, rule="code"):
    folder = root / record / "defense" / tag
    folder.mkdir(parents=True)
    (root / record / "attack_summary.json").write_text(
        json.dumps({"attack": record.split("_")[0], "config": {"attack_target": target}}))
    ranking = sorted(range(len(scores)), key=lambda j: -abs(scores[j] - 1.0))  # as rule paper
    summary = {
        "method": "ulrl", "before": {"test_acc": 0.9, "test_asr": 0.99},
        "after": {"test_acc": 0.88, "test_asr": asr_after},
        "flagged_neurons": [{"neuron": j, "score": scores[j]} for j in flagged],
        "identification": {"scores": scores, "rule": rule, "median": 1.0, "threshold": 2.5,
                           "ranking": ranking, "flagged": flagged},
        "no_flag_action": None,
        "unlearning": {"epochs": 3, "reached_threshold": True,
                       "predictions_per_class": predictions},
        "relearning": {"final_cosine": 0.05}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder / "summary.json"


def test_a_sink_class_that_outmoves_the_target_is_reported(tmp_path):
    path = make_run(tmp_path, "blind_fm_w16", "ulrl", target=0,
                    scores=[3.0, 1.0, 1.1, 0.9, 1.0, 1.2, 9.0, 1.0, 0.8, 1.0], flagged=[6],
                    asr_after=0.97, predictions=[10, 0, 0, 0, 0, 0, 80, 5, 5, 0])
    row = diagnose_run(path)
    assert row["target"] == 0 and row["target_rank"] == 2 and row["flagged"] == [6]
    assert row["sink"] == 6 and row["sink_share"] == 80.0
    assert [j for j, _ in row["top3"]] == [6, 0, 5]


def test_the_table_lists_every_run_and_explains_only_failures(tmp_path):
    make_run(tmp_path, "badnet_fm_w16", "ulrl", 0, [9.0] + [1.0] * 9, [0], 0.001,
             [90] + [1] * 9)
    make_run(tmp_path, "blind_fm_w16", "ulrl_paper", 0,
             [3.0, 1.0, 1.1, 0.9, 1.0, 1.2, 9.0, 1.0, 0.8, 1.0], [6, 0], 0.5,
             [10, 0, 0, 0, 0, 0, 80, 5, 5, 0], rule="paper")
    out = tmp_path / "diagnosis.md"
    main([str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "| badnet | ulrl | code | 99.00 | 0.10 |" in text
    assert "| blind | ulrl_paper | paper | 99.00 | 50.00 |" in text
    assert "Failures (ASR after > 10 %): 1 of 2 runs." in text
    assert "**blind, ulrl_paper (rule paper)**" in text and "**badnet" not in text
    assert "class 6 collects 80 %" in text and "the target is flagged" in text
