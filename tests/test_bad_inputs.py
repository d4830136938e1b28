"""The bad-input catalog (issue 7): every case ends in one clear line naming the problem and what to
do, a non-zero exit, no traceback unless --debug, and no partial result (no result folder, stage,
lock or *.tmp from the failed run; a run that fails before it starts leaves no folder at all).

Entry points run in-process through `main_guard(main, argv)` on a tiny record and a 600 + 100 image
stand-in for Fashion-MNIST, so a case costs well under a second; one case (SIGTERM) is a subprocess.

Cases covered elsewhere (not repeated here):
  missing record folder            test_cli_errors::test_missing_record
  --result_file missing            test_cli_errors::test_result_file_required
  malicious pickle: os.system      test_cli_errors::test_malicious_record_refused_without_running_it
  unknown model_name               test_cli_errors::test_unknown_model_name_in_record
  unwritable output folder         test_cli_errors::test_unwritable_output_folder
  NaN weights                      test_cli_errors::test_nan_weights_stop_with_a_clear_error_and_no_result
  ratio 0, missing index file      test_cli_errors::test_bad_subset_options
  --dataset / --model vs record    test_cli_errors::test_dataset_or_model_disagreeing_with_the_record
  image path leaving the record    test_record::test_path_escaping_record_folder_is_refused
  invalid yaml, unknown command-line flag, bad choice   test_config
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import attack.badnet as badnet
import defense.ulrl as ulrl
from models import build_model
import utils.data.datasets as datasets
from tests.helpers import HANG_GUARD_S, Payload, tiny_record
from tests.helpers import write_fashion_mnist
from utils.core.cli import main_guard
from utils.core.config import Option, parse_config
from utils.core.errors import UserError
from utils.core.io import torch_save
from utils.data.images import ImageSet
from utils.data.record import RECORD_FILE, save_attack_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("defense_result.pt", "summary.json")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), n_train=600, n_test=100)


@pytest.fixture
def record(tmp_path) -> Path:
    return tiny_record(tmp_path / "r")


def ulrl_args(record: Path, data_root: Path, *extra) -> list[str]:
    """A short ULRL run on the tiny record: 120 defense images, one epoch per phase."""
    return ["--result_file", record.name, "--record_dir", str(record.parent), "--dataset_path",
            str(data_root), "--device", "cpu", "--threads", "1", "--ratio", "0.2",
            "--unlearning_epochs", "1", "--relearn_epochs", "1", *map(str, extra)]


def fails(capsys, argv, main=ulrl.main, code=2) -> str:
    """Run an entry point as its command line would; return its one error line. Before it, stderr
    may only hold the run's warnings (stdout has its progress): no traceback, no usage block."""
    with pytest.raises(SystemExit) as done:
        main_guard(main, argv)
    assert done.value.code == code
    *before, line = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert all(" WARNING " in earlier for earlier in before), before
    return line


def assert_no_result(record: Path, started: bool = False) -> None:
    """Nothing of the failed run anywhere in the record: no result folder, no stage, no lock, no
    temporary file; before a run starts, not even the defense/ folder."""
    assert not list(record.rglob("*.tmp")) and not list(record.rglob(".ulrl.*"))
    assert not (record / "defense" / "ulrl").exists()
    if not started:
        assert not (record / "defense").exists()


def edit_record(record: Path, **changes) -> None:
    path = record / RECORD_FILE
    raw = torch.load(path, weights_only=False)
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    torch_save(path, raw)


def smallcnn_state(num_classes: int = 10) -> dict:
    torch.manual_seed(0)
    return build_model("smallcnn", num_classes, in_channels=1, image_size=28).state_dict()


def a_png(record: Path) -> Path:
    return sorted((record / "bd_test_dataset").rglob("*.png"))[0]


# ---------------------------------------------------------------- the record file

def test_record_folder_without_attack_result(capsys, tmp_path, data_root):
    (tmp_path / "r").mkdir()
    line = fails(capsys, ulrl_args(tmp_path / "r", data_root))
    assert "no attack record at" in line and "attack_result.pt" in line and "--result_file" in line
    assert not (tmp_path / "r" / "defense").exists()


def test_truncated_record(capsys, record, data_root):
    path = record / RECORD_FILE
    path.write_bytes(path.read_bytes()[:1000])
    line = fails(capsys, ulrl_args(record, data_root))
    assert str(path) in line and "truncated or corrupt" in line and "regenerate" in line
    assert_no_result(record, started=True)


def test_record_that_is_not_a_pickle(capsys, record, data_root):
    (record / RECORD_FILE).write_text("model_name: smallcnn\nnum_classes: 10\n")
    line = fails(capsys, ulrl_args(record, data_root))
    assert "truncated or corrupt" in line
    assert_no_result(record, started=True)


@pytest.mark.parametrize("payload, refused", [
    ("eval", "eval"), ("subprocess", "subprocess.check_output"),
    ("nested_in_dict", "posix.system"), ("numpy_object_array", "object-dtype array")])
def test_malicious_pickle_refused_without_running(capsys, record, data_root, payload, refused):
    pwned = record / "pwned"
    command = f"touch {pwned}"
    evil = {"eval": lambda: Payload(eval, f"__import__('os').system('{command}')"),
            "subprocess": lambda: Payload(subprocess.check_output, ["touch", str(pwned)]),
            "nested_in_dict": lambda: {"a": {"b": [1, {"c": Payload(os.system, command)}]}},
            "numpy_object_array": lambda: np.array([Payload(os.system, command)], dtype=object),
            }[payload]()
    edit_record(record, bd_test={"payload": evil})
    line = fails(capsys, ulrl_args(record, data_root))
    assert refused in line
    if payload != "numpy_object_array":  # refused as an object array before any global runs
        assert "--trust_record" in line and "run code" in line
    assert not pwned.exists()
    assert_no_result(record, started=True)


@pytest.mark.parametrize("key", ["model", "bd_test", "num_classes"])
def test_record_missing_a_key(capsys, record, data_root, key):
    edit_record(record, **{key: None})
    line = fails(capsys, ulrl_args(record, data_root))
    assert f"'{key}' is missing" in line and "not a BackdoorBench attack record" in line
    assert_no_result(record, started=True)


def test_extra_state_dict_key(capsys, record, data_root):
    """Extra top-level keys are ignored (tools add their own); an extra weight is an error."""
    edit_record(record, model={**smallcnn_state(), "linear.extra": torch.zeros(3)},
                note="added by another tool")
    line = fails(capsys, ulrl_args(record, data_root))
    assert "1 unexpected keys: linear.extra" in line and "model_name" in line
    assert_no_result(record, started=True)


def test_num_classes_disagreeing_with_the_weights(capsys, record, data_root):
    edit_record(record, model=smallcnn_state(num_classes=9))
    line = fails(capsys, ulrl_args(record, data_root))
    assert "linear.weight (9, 128) vs model (10, 128)" in line and "num_classes" in line
    assert_no_result(record, started=True)


def test_state_dict_shape_mismatch(capsys, record, data_root):
    state = smallcnn_state()
    state["features.0.weight"] = torch.zeros(16, 1, 5, 5)
    edit_record(record, model=state)
    line = fails(capsys, ulrl_args(record, data_root))
    assert "features.0.weight (16, 1, 5, 5) vs model (16, 1, 3, 3)" in line
    assert_no_result(record, started=True)


def test_record_num_classes_disagreeing_with_the_data_set(capsys, record, data_root):
    edit_record(record, num_classes=5, model=smallcnn_state(num_classes=5))
    line = fails(capsys, ulrl_args(record, data_root))
    assert "record says 5 classes but fashion_mnist has 10" in line
    assert_no_result(record, started=True)


def test_unknown_data_set_in_the_record(capsys, record, data_root):
    edit_record(record, clean_data="imagenet22k")
    line = fails(capsys, ulrl_args(record, data_root))
    assert "unknown dataset 'imagenet22k'" in line and "fashion_mnist" in line
    assert_no_result(record, started=True)


def test_control_characters_in_the_record_are_escaped(capsys, record, data_root):
    edit_record(record, model_name="\x1b[2Jevil\nname")
    line = fails(capsys, ulrl_args(record, data_root))
    assert "\x1b" not in line and "\\x1b[2Jevil\\nname" in line
    assert_no_result(record, started=True)


# ---------------------------------------------------------------- clean data and poisoned images

def test_data_root_missing(capsys, record, tmp_path, monkeypatch):
    spec = datasets.get_dataset("fashion_mnist")  # without the system-wide copy to fall back on
    monkeypatch.setitem(datasets._REGISTRY, "fashion_mnist",
                        dataclasses.replace(spec, search_dirs=()))
    line = fails(capsys, ulrl_args(record, tmp_path / "no_data"))
    assert "dataset 'fashion_mnist' not found" in line and "no_data" in line
    assert "--dataset_path" in line
    assert_no_result(record, started=True)


def test_clean_data_of_the_wrong_image_size(capsys, record, tmp_path):
    data = write_fashion_mnist(tmp_path / "data", n_train=20, n_test=20, side=32)
    line = fails(capsys, ulrl_args(record, data))
    assert "(1, 32, 32), expected (1, 28, 28)" in line and "replace the files" in line
    assert_no_result(record, started=True)


def test_poisoned_image_of_the_wrong_size(capsys, tmp_path, data_root):
    images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    bd_test = ImageSet(images, torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4]),
                       torch.ones(4, dtype=torch.bool), torch.arange(4))
    save_attack_record(tmp_path / "r", model_name="smallcnn", num_classes=10,
                       state_dict=smallcnn_state(), clean_data="fashion_mnist",
                       img_size=(28, 28, 1), bd_train=None, bd_test=bd_test, train_length=600,
                       test_length=100)
    line = fails(capsys, ulrl_args(tmp_path / "r", data_root))
    assert "is 32x32 but the clean data are 28x28" in line and "pick the data set" in line
    assert_no_result(tmp_path / "r", started=True)


def test_poisoned_png_missing(capsys, record, data_root):
    png = a_png(record)
    png.unlink()
    line = fails(capsys, ulrl_args(record, data_root))
    assert f"image {png}" in line and "is missing" in line and "bd_*_dataset" in line
    assert_no_result(record, started=True)


def test_poisoned_png_unreadable(capsys, record, data_root):
    png = a_png(record)
    png.write_bytes(png.read_bytes()[:40])
    line = fails(capsys, ulrl_args(record, data_root))
    assert f"cannot decode image {png}" in line and "damaged" in line
    assert_no_result(record, started=True)


# ---------------------------------------------------------------- the defense subset

@pytest.mark.parametrize("content, expected", [
    ("5\n600\n", "outside 0..599"), ("-1\n", "outside 0..599"),
    ("3\n7\n3\n", "repeats indices"), ("", "is empty"), ("1\nseven\n", "one integer per line")])
def test_bad_index_file(capsys, record, data_root, tmp_path, content, expected):
    index = tmp_path / "index.txt"
    index.write_text(content)
    argv = ulrl_args(record, data_root, "--index", index)
    del argv[argv.index("--ratio"):argv.index("--ratio") + 2]  # --index replaces --ratio
    line = fails(capsys, argv)
    assert f"index file {index}" in line and expected in line
    assert_no_result(record, started=True)


@pytest.mark.parametrize("ratio", ["1.5", "-0.1"])
def test_ratio_outside_0_1(capsys, record, data_root, ratio):
    line = fails(capsys, ulrl_args(record, data_root, "--ratio", ratio))
    assert f"--ratio must be in (0, 1], got {float(ratio)}" in line
    assert_no_result(record)  # refused with the other options, before the run starts


def test_defense_subset_smaller_than_the_class_count(capsys, record, data_root):
    line = fails(capsys, ulrl_args(record, data_root, "--ratio", "0.01"))  # 6 images, 10 classes
    assert "6 images" in line and "10 classes" in line and "--ratio" in line
    assert_no_result(record, started=True)


def test_defense_subset_smaller_than_a_batch_runs(record, data_root):
    """Not an error: one partial batch per epoch (the paper's 1 % of a small data set)."""
    main_guard(ulrl.main, ulrl_args(record, data_root, "--ratio", "0.05", "--batch_size", 128))
    summary = json.loads((record / "defense/ulrl/summary.json").read_text())
    assert summary["defense_samples"] == 30 and summary["relearning"]["epochs"] == 1


# ---------------------------------------------------------------- the algorithm's edge cases

def test_non_finite_loss_during_unlearning(capsys, record, data_root):
    line = fails(capsys, ulrl_args(record, data_root, "--unlearning_lr", "1e30", "--clip_norm", 0,
                                   "--unlearning_epochs", 3, "--clean_threshold", -1))
    assert "training loss became nan (not finite)" in line and "lower the learning rate" in line
    assert_no_result(record, started=True)


def test_mad_zero_flags_nothing_and_says_so(record, data_root):
    """Not an error: the weights do not move, every score is 0, so MAD = 0 and the mean-deviation
    fallback is 0 too; nothing is flagged, and the summary and log say so."""
    main_guard(ulrl.main, ulrl_args(record, data_root, "--unlearning_lr", "1e-30"))
    out = record / "defense/ulrl"
    found = json.loads((out / "summary.json").read_text())["identification"]
    assert found["mad"] == 0 and found["scale"] == "none (all scores equal)"
    assert found["flagged"] == [] and "no neuron was flagged" in (out / "ulrl.log").read_text()


def test_every_neuron_flagged_is_reported(record, data_root):
    main_guard(ulrl.main, ulrl_args(record, data_root, "--tau", "1e9", "--no_flag_action", "top",
                                    "--ht", 10))
    out = record / "defense/ulrl"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["flagged_neurons"]) == 10
    assert "every classifier neuron is flagged" in (out / "ulrl.log").read_text()


# ---------------------------------------------------------------- environment and output

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_but_absent(capsys, record, data_root):
    line = fails(capsys, ulrl_args(record, data_root, "--device", "cuda"))
    assert "CUDA is not available" in line and "--device cpu" in line
    assert_no_result(record)


def test_unknown_device(capsys, record, data_root):
    line = fails(capsys, ulrl_args(record, data_root, "--device", "tpu"))
    assert "unknown device 'tpu'" in line and "cpu, cuda or cuda:N" in line
    assert_no_result(record)


def test_disk_full_while_writing_the_result(capsys, record, data_root, monkeypatch):
    def full_disk(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    line = fails(capsys, ulrl_args(record, data_root))
    out = record / "defense/ulrl"
    assert f"cannot write {out.parent}/.ulrl.tmp-" in line and "/defense_result.pt" in line
    assert "free disk space" in line
    assert_no_result(record, started=True)
    monkeypatch.undo()
    main_guard(ulrl.main, ulrl_args(record, data_root))  # with space again, the rerun works
    assert all((out / name).is_file() for name in RESULTS)


def test_interrupted_relearning_leaves_no_result_and_a_rerun_works(capsys, record, data_root,
                                                                   monkeypatch):
    penalty = ulrl.cosine_penalty

    def interrupted(*args):  # Ctrl-C in the first relearning step
        raise KeyboardInterrupt

    monkeypatch.setattr(ulrl, "cosine_penalty", interrupted)
    assert fails(capsys, ulrl_args(record, data_root), code=130) == "interrupted"
    assert_no_result(record, started=True)
    monkeypatch.setattr(ulrl, "cosine_penalty", penalty)
    main_guard(ulrl.main, ulrl_args(record, data_root))
    assert all((record / "defense/ulrl" / name).is_file() for name in RESULTS)


def test_sigterm_during_relearning_cleans_up(record, data_root):
    """End to end: a real process, terminated (as `timeout` or a scheduler does) mid-relearning."""
    out = record / "defense/ulrl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "defense/ulrl.py"),
                             *ulrl_args(record, data_root, "--relearn_epochs", 100000)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not any("phase relearning" in p.read_text()
                      for p in out.parent.glob(".ulrl.tmp-*/.ulrl.log.*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, "relearning never began"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert_no_result(record, started=True)


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("yaml_text, argv, expected", [
    ("relearn_lrr: 0.01\n", [], "unknown key 'relearn_lrr' (did you mean 'relearn_lr'?)"),
    ("unlearning_epochs: lots\n", [], "'unlearning_epochs' must be int, got 'lots'"),
    ("unlearning_epochs: 2.5\n", [], "'unlearning_epochs' must be int, got 2.5"),
    ("alpha: .inf\n", [], "'alpha' must be a finite number"),
    (None, ["--yaml_path", "missing.yaml"], "config file missing.yaml not found"),
    ("", ["--unlearning_lr", "fast"], "argument --unlearning_lr: invalid float value: 'fast'"),
    ("", ["--amp", "maybe"], "argument --amp: not a boolean: 'maybe', use true or false"),
    ("", ["--unlearning_lr", "inf"], "'unlearning_lr' must be a finite number"),
    ("", ["--seed", str(2**70)], "'seed' must fit in 64 bits"),
    ("", ["--tau", "nan"], "'tau' must be a finite number"),
], ids=["unknown_yaml_key", "wrong_type_in_yaml", "fraction_for_an_int_in_yaml", "inf_in_yaml",
        "missing_yaml_file", "wrong_type_on_command_line", "bad_boolean_on_command_line",
        "inf_on_command_line", "seed_beyond_64_bits", "nan_on_command_line"])
def test_config_error(capsys, tmp_path, monkeypatch, record, data_root, yaml_text, argv,
                      expected):
    monkeypatch.chdir(tmp_path)
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = ["--yaml_path", "c.yaml", *argv]
    line = fails(capsys, ulrl_args(record, data_root, *argv))
    assert line.startswith("error: ") and expected in line
    assert_no_result(record)


def test_conflicting_options_mechanism():
    options = {"index": Option(None, "file", str, conflicts=("ratio",)), "ratio": Option(0.01, "")}
    assert parse_config(options, "t", ["--index", "i.txt"]).index == "i.txt"
    with pytest.raises(UserError, match="'index' and 'ratio' cannot be used together"):
        parse_config(options, "t", ["--index", "i.txt", "--ratio", "0.1"])


def test_conflicting_options_index_and_ratio(capsys, record, data_root, tmp_path):
    index = tmp_path / "index.txt"
    index.write_text("1\n2\n")
    line = fails(capsys, ulrl_args(record, data_root, "--index", index))  # ulrl_args has --ratio
    assert "'index' and 'ratio' cannot be used together" in line
    assert_no_result(record)


# ---------------------------------------------------------------- --debug and unexpected errors

def test_unexpected_exception_is_one_line_with_exit_1(capsys, record, data_root, monkeypatch):
    def bug(*args):
        raise RuntimeError("deep inside torch\nsecond line of detail")

    monkeypatch.setattr(ulrl, "score_neurons", bug)
    line = fails(capsys, ulrl_args(record, data_root), code=1)
    assert line == ("error: RuntimeError: deep inside torch (rerun with --debug for the "
                    "traceback)")
    assert_no_result(record, started=True)
    with pytest.raises(RuntimeError, match="deep inside torch"):  # --debug: the exception itself
        main_guard(ulrl.main, ulrl_args(record, data_root, "--debug"))


@pytest.mark.parametrize("main, argv", [
    (ulrl.main, ["--ratio", "0"]),
    (badnet.main, ["--dataset", "fashion_mnist", "--pratio", "2"]),
], ids=["ulrl", "badnet"])
def test_debug_prints_the_traceback(capsys, record, data_root, tmp_path, main, argv):
    args = ulrl_args(record, data_root, *argv) if main is ulrl.main else \
        [*argv, "--dataset_path", str(data_root), "--record_dir", str(tmp_path / "records")]
    line = fails(capsys, args, main=main)
    assert "must be in" in line and "Traceback" not in line
    with pytest.raises(SystemExit) as done:
        main_guard(main, [*args, "--debug"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback (most recent call last)" in err
    assert "UserError" in err and "must be in" in err


def test_badnet_bad_input_leaves_no_record(capsys, tmp_path):
    records = tmp_path / "records"  # 32x32 images where 28x28 belong: fails after it started
    data = write_fashion_mnist(tmp_path / "data", n_train=20, n_test=20, side=32)
    line = fails(capsys, ["--dataset", "fashion_mnist", "--dataset_path", str(data),
                          "--record_dir", str(records), "--model", "smallcnn"], main=badnet.main)
    assert "expected (1, 28, 28)" in line
    assert list(records.iterdir()) == []  # the temporary record folder is gone

