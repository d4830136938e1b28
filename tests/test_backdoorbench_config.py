"""BackdoorBench drop-in: its defense yamls load as they are (aliases, runtime keys ignored with a
notice, empty values = from the record, contradictions checked), its df_summary layout is written,
and nothing falls back silently (the yaml picked without --yaml_path, the data folder read, the
test set named, a rerun replaces the whole result)."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_script
from tests.helpers import needs_fashion_mnist
from utils.core.config import Option, load_yaml, parse_config
from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_YAML = ROOT / "tests/fixtures/backdoorbench_ulrl_cifar10.yaml"
# What differs between data sets (the "dataset aside"), and a short run
RECORD_KEYS = ["--dataset", "fashion_mnist", "--model", "smallcnn", "--input_height", 28,
               "--input_width", 28, "--input_channel", 1, "--device", "cpu"]
SHORT = ["--unlearning_epochs", 2, "--relearn_epochs", 1, "--plots", "false"]


def defend(record, *args, script="defense/ulrl.py"):
    records, name = record
    return run_script(script, "--result_file", name, "--record_dir", records, *args)


def read_rows(path: Path) -> dict:
    with path.open() as file:
        return {row[""]: row for row in csv.DictReader(file)}


@needs_fashion_mnist
def test_the_public_ulrl_yaml_runs_unchanged(small_badnet_record):
    done = defend(small_badnet_record, "--yaml_path", PUBLIC_YAML, *RECORD_KEYS, *SHORT,
                  "--tag", "bbyaml")
    assert done.returncode == 0, done.stderr
    records, name = small_badnet_record
    out = records / name / "defense/ulrl_bbyaml"
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    # BackdoorBench's names reach the settings they mean
    assert (config["alpha"], config["seed"], config["unlearning_weight_decay"]) == (0.7, 0, 5e-4)
    assert (config["unlearning_momentum"], config["unlearning_gamma"]) == (0.9, 0.1)
    assert config["unlearning_milestones"] == [10, 20] and config["linear_name"] == "linear"
    assert summary["config_sources"]["alpha"] == f"yaml {PUBLIC_YAML}"
    assert config["target_label"] is None  # empty: from the record
    notices = [line for line in done.stdout.splitlines() if "ignored BackdoorBench" in line]
    assert len(notices) == 1 and "num_workers" in notices[0] and "pin_memory" in notices[0]
    # the data folder actually read is logged and recorded (../data has no Fashion-MNIST)
    assert summary["data_folder"] in done.stdout and summary["data_folder"] != "../data"
    assert summary["test_set"] == "the fashion_mnist test split (10000 images)"
    # BackdoorBench's df_summary layout, and ours beside it
    rows = read_rows(out / "ulrl_bbyaml_df_summary.csv")
    assert list(rows) == ["last", "valid_max", "exist_nan_value"]
    assert float(rows["valid_max"]["test_acc"]) >= float(rows["last"]["test_acc"])
    assert rows["exist_nan_value"]["test_ra"] == "False"
    pandas = pytest.importorskip("pandas")  # as BackdoorBench's analysis code reads it
    frame = pandas.read_csv(out / "ulrl_bbyaml_df_summary.csv", index_col=0)
    assert float(frame.loc["last", "test_asr"]) == pytest.approx(summary["after"]["test_asr"])
    with (out / "ulrl_bbyaml_before_after.csv").open() as file:
        assert [row["model"] for row in csv.DictReader(file)] == ["backdoored", "ulrl_bbyaml"]


@needs_fashion_mnist
@pytest.mark.parametrize("args, message", [
    (["--target_label", 3], "--target_label 3 disagrees with the record, whose backdoor test set "
                            "is labelled \\[0\\]"),
    (["--input_height", 32], "--input_height 32 disagrees with the record, which has 28"),
    (["--num_classes", 43], "--num_classes 43 disagrees with the record, which has 10"),
    (["--model", "preactresnet18"], "--model preactresnet18 disagrees with the record"),
], ids=["target", "height", "classes", "model"])
def test_keys_that_contradict_the_record_are_errors(small_badnet_record, args, message, tmp_path):
    done = defend(small_badnet_record, "--yaml_path", PUBLIC_YAML,
                  *RECORD_KEYS, *args, "--output_dir", tmp_path / "out")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert __import__("re").search(message, done.stderr), done.stderr
    assert not (tmp_path / "out").exists()


def test_aliases_empty_values_and_hints(tmp_path):
    options = {"alpha": Option(0.7, "a", aliases=("relearn_alpha",)),
               "seed": Option(0, "s", aliases=("random_seed",)),
               "num_workers": Option(None, "n", ignored=True)}
    path = tmp_path / "c.yaml"
    path.write_text("relearn_alpha: 0.3\nrandom_seed:\nnum_workers: [1, 2]\n")
    assert load_yaml(path, options) == {"alpha": 0.3, "num_workers": [1, 2]}  # seed: default
    cfg = parse_config(options, "t", ["--yaml_path", str(path), "--random_seed", "4"])
    assert (cfg.alpha, cfg.seed) == (0.3, 4) and cfg.sources["seed"] == "command line"
    path.write_text("alpha: 0.3\nrelearn_alpha: 0.5\n")
    with pytest.raises(UserError, match="'alpha' and 'relearn_alpha' are the same setting"):
        load_yaml(path, options)
    path.write_text("relearn_alpah: 0.3\n")
    with pytest.raises(UserError, match="did you mean 'relearn_alpha'"):
        load_yaml(path, options)
    path.write_text("num_workers: 2024-01-01\n")  # an ignored value stays what summary.json holds
    assert load_yaml(path, options) == {"num_workers": "2024-01-01"}


def test_every_key_of_the_public_yaml_is_known():
    from defense.ulrl import OPTIONS
    from utils.core.config import option_names
    keys = yaml.safe_load(PUBLIC_YAML.read_text())
    assert set(keys) <= set(option_names(OPTIONS))


@needs_fashion_mnist
def test_without_yaml_path_the_data_sets_yaml_is_used_and_said(small_badnet_record):
    done = defend(small_badnet_record, *SHORT, "--tag", "noyaml")
    assert done.returncode == 0, done.stderr
    assert "no --yaml_path: using config/defense/ulrl/fashion_mnist.yaml" in done.stdout
    records, name = small_badnet_record
    summary = json.loads((records / name / "defense/ulrl_noyaml/summary.json").read_text())
    assert summary["config"]["alpha"] == 0.1 and summary["config"]["relearn_lr"] == 0.01
    assert "picked for fashion_mnist/smallcnn" in summary["config_sources"]["alpha"]
    assert summary["config_sources"]["unlearning_epochs"] == "command line"
    defaults = defend(small_badnet_record, *SHORT, "--tag", "noyaml", "--yaml_path", "none")
    assert defaults.returncode == 0, defaults.stderr
    summary = json.loads((records / name / "defense/ulrl_noyaml/summary.json").read_text())
    assert summary["config"]["alpha"] == 0.7 and summary["config_sources"]["alpha"] == "default"


@needs_fashion_mnist
def test_a_rerun_replaces_the_whole_result(small_badnet_record):
    records, name = small_badnet_record
    out = records / name / "defense/ft_rerun"
    first = defend(small_badnet_record, "--epochs", 1, "--curve_samples", 50, "--tag", "rerun",
                   script="defense/ft.py")
    assert first.returncode == 0, first.stderr
    assert (out / "curves.png").is_file()
    second = defend(small_badnet_record, "--epochs", 1, "--plots", "false", "--tag", "rerun",
                    script="defense/ft.py")
    assert second.returncode == 0, second.stderr
    assert not (out / "curves.png").exists() and (out / "summary.json").is_file()


@needs_fashion_mnist
def test_the_attack_summary_names_its_test_subset_and_the_whole_split(small_badnet_record):
    records, name = small_badnet_record
    summary = json.loads((records / name / "attack_summary.json").read_text())
    assert summary["test_set"] == "2000 of the 10000 fashion_mnist test images (--test_size)"
    assert 0.6 < summary["final"]["test_acc_full_split"] <= 1
