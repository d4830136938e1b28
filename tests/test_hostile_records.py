"""Hostile records (issue 12): a record, a yaml inside its folder and every file it ships are made by
the party the defender distrusts. Each case ends in one clear error line or a correct result, runs
no code of the record's, writes nothing outside the run's own output folder and never leaves a
mixed result set. Classes, in the issue's order:

  1 code execution through the batch scripts   test_sweep_refuses_*, test_trust_record_*
  2 writes through planted links               test_*link*
  3 one consistent result set                  test_shipped_summary_*, test_interrupted_retune_*,
                                               test_second_run_*, test_failed_rerun_*
  4 small files, huge memory                   test_memory_bombs_*, test_yaml_*
  5 values                                     test_bad_values_*, test_bd_train_*,
                                               test_non_finite_outputs_*
  6 PNG only                                   test_only_png_is_decoded
  7 allowlist, protocols and messages          test_object_dtype_*, test_image_without_state,
                                               test_pickle_protocols_*, test_command_line_numbers
"""
from __future__ import annotations

import copy
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
from PIL import Image

import defense.ulrl as ulrl
import utils.defenses.run
from tests.helpers import HANG_GUARD_S, Payload, tiny_record
from tests.hostile_helpers import HOSTILE_FILES, image_with_state
from tests.test_bad_inputs import (assert_no_result, data_root, edit_record, fails,  # noqa: F401
                                   record, smallcnn_state, ulrl_args)
from tests.test_sweep import sh
from utils.core.cli import main_guard
from utils.core.errors import UserError
from utils.core.result_set import ResultSet, verify_summary
from utils.data.images import ImageSet
from utils.data.record import RECORD_FILE, load_attack_record, save_attack_record

ROOT = Path(__file__).resolve().parents[1]


def files_below(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def a_result(record: Path, data_root: Path, *extra) -> dict[str, bytes]:
    """A successful run's result folder, file by file."""
    main_guard(ulrl.main, ulrl_args(record, data_root, "--plots", "false", *extra))
    return files_below(record / "defense/ulrl")


def with_bd_train(folder: Path, labels=(1, 2, 3, 4), bd_labels=(0, 0, 0, 0), index=range(4),
                  num_train=600) -> Path:
    """tiny_record plus a 4-image bd_train over the 600-image stand-in's training set."""
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    bd = ImageSet(images, torch.tensor(bd_labels), torch.tensor(labels),
                  torch.ones(4, dtype=torch.bool), torch.tensor(list(index)))
    test = ImageSet(images, torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4]),
                    torch.ones(4, dtype=torch.bool), torch.arange(4))
    save_attack_record(folder, model_name="smallcnn", num_classes=10, state_dict=smallcnn_state(),
                       clean_data="fashion_mnist", img_size=(28, 28, 1), bd_train=bd, bd_test=test,
                       train_length=num_train, test_length=100, mode="ram")
    return folder


# ---------------------------------------------------------------- 1 code execution

def test_sweep_refuses_record_strings_that_are_not_registered_names(tmp_path):
    """The issue's attack: the record's attack_summary.json points the sweep at a yaml the record
    ships, which would set trust_record and unpickle a payload."""
    rec = tiny_record(tmp_path / "evil")
    pwned = tmp_path / "pwned"
    torch.save({"model": Payload(os.system, f"touch {pwned}")}, rec / RECORD_FILE)
    (rec / "cfg.yaml").write_text("trust_record: true\n")
    (rec / "attack_summary.json").write_text(json.dumps(
        {"dataset": f"../../../../..{rec}/cfg", "model": "x"}))
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl")
    assert done.returncode == 1 and not pwned.exists()
    assert "is not a registered data set" in done.stdout and "FAILED" in done.stdout
    assert not (rec / "defense").exists()


def test_trust_record_cannot_come_from_a_yaml(capsys, record, data_root, tmp_path):
    (tmp_path / "c.yaml").write_text("trust_record: true\n")
    line = fails(capsys, ulrl_args(record, data_root, "--yaml_path", tmp_path / "c.yaml"))
    assert "'trust_record' can only be given on the command line" in line
    assert_no_result(record)


# ---------------------------------------------------------------- 2 links

@pytest.mark.parametrize("planted", ["defense", "defense/ulrl", "defense/.ulrl.lock"])
def test_planted_link_is_refused_and_not_written_through(capsys, record, data_root, tmp_path,
                                                         planted):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    link = record / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target / "precious" if planted.endswith(".lock") else target)
    line = fails(capsys, ulrl_args(record, data_root))
    assert "is a symbolic link" in line and planted.split("/")[-1] in line
    assert "remove the link" in line
    assert sorted(p.name for p in target.iterdir()) == ["precious"]
    assert (target / "precious").read_text() == "keep"


def test_sweep_log_link_is_refused(tmp_path):
    tiny_record(tmp_path / "r")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "r/defense").mkdir()
    (tmp_path / "r/defense/ulrl_run.txt").symlink_to(victim)
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "r")
    assert done.returncode == 1 and "is a symbolic link" in done.stdout
    assert victim.read_text() == "keep" and not (tmp_path / "r/defense/ulrl").exists()


# ---------------------------------------------------------------- 3 one result set

def test_shipped_summary_does_not_count_as_done(tmp_path):
    rec = tiny_record(tmp_path / "r")
    shipped = rec / "defense/ulrl"
    shipped.mkdir(parents=True)
    (shipped / "defense_result.pt").write_bytes(b"x")
    fake = {"method": "ulrl", "record": str(rec), "before": {}, "after": {},
            "result_seal": {"files": {"defense_result.pt": "0" * 64}, "hmac": "0" * 64}}
    (shipped / "summary.json").write_text(json.dumps(fake))
    assert verify_summary(shipped / "summary.json") is not None
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--dry-run")
    assert "is not a result of this tool" in done.stdout
    assert "/defense/ulrl.py --result_file r " in done.stdout


def test_a_real_result_verifies_and_a_changed_one_does_not(record, data_root):
    a_result(record, data_root)
    summary = record / "defense/ulrl/summary.json"
    assert verify_summary(summary) is None
    (record / "defense/ulrl/index.txt").write_text("1\n")  # one file of another run
    assert "differ" in verify_summary(summary)


def test_interrupted_retune_keeps_the_previous_result(capsys, record, data_root, monkeypatch):
    """SIGTERM (raised as in main_guard) during --retune_check: the previous result stays whole,
    nothing of the interrupted run is left."""
    args = ("--retune_check", "--retune_poison_ratio", "0.01")
    previous = a_result(with_bd_train(record), data_root, *args)

    def terminated(run):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(utils.defenses.run, "retune_check", terminated)
    assert fails(capsys, ulrl_args(record, data_root, "--seed", "1", *args), code=143) == \
        "interrupted"
    assert files_below(record / "defense/ulrl") == previous
    assert sorted(p.name for p in (record / "defense").iterdir()) == ["ulrl"]


def test_failed_rerun_keeps_the_previous_result(capsys, record, data_root, monkeypatch):
    previous = a_result(record, data_root)
    monkeypatch.setattr(utils.defenses.run, "write_plots", lambda *a: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    line = fails(capsys, ulrl_args(record, data_root, "--seed", "3"), code=1)
    assert "No space left" in line
    assert files_below(record / "defense/ulrl") == previous
    assert sorted(p.name for p in (record / "defense").iterdir()) == ["ulrl"]


def test_second_run_on_the_same_record_fails_clearly(capsys, record, data_root):
    with pytest.raises(KeyboardInterrupt), ResultSet(record, "ulrl"):  # a first run, working
        line = fails(capsys, ulrl_args(record, data_root))
        assert not (record / "defense/ulrl").exists()
        raise KeyboardInterrupt  # the first run ends without a result
    assert "another run is writing" in line and "--tag" in line
    assert_no_result(record, started=True)
    a_result(record, data_root)  # once the first run is done, a run works


def test_second_run_while_a_real_run_works(record, data_root):
    """Two processes on one record: the second ends with one line while the first keeps going."""
    first = subprocess.Popen([sys.executable, str(ROOT / "defense/ulrl.py"),
                              *ulrl_args(record, data_root, "--relearn_epochs", 100000)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not list((record / "defense").glob(".ulrl.tmp-*/.ulrl.log.*.tmp")):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never began"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, str(ROOT / "defense/ulrl.py"),
                                 *ulrl_args(record, data_root)], cwd=ROOT, capture_output=True,
                                text=True, timeout=HANG_GUARD_S)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=HANG_GUARD_S)
    assert second.returncode == 2
    [line] = second.stderr.strip().splitlines()
    assert line.startswith("error: another run is writing") and str(record) in line
    assert_no_result(record, started=True)  # the first was terminated: nothing of either


# ---------------------------------------------------------------- 4 memory

@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_memory_bombs_are_refused_before_allocating(tmp_path, name):
    path = HOSTILE_FILES[name](tmp_path / name)
    assert path.stat().st_size < 2**20
    with pytest.raises(UserError, match="damaged or malicious|does not match"):
        load_attack_record(tmp_path / name)


def test_memory_bombs_stay_under_2_gib(tmp_path):
    """All of them loaded by one fresh process: its peak RSS (torch included) stays far below the
    2 GiB the issue allows; unbounded, the first alone took 3.8 GB."""
    done = subprocess.run([sys.executable, "-m", "tests.hostile_helpers", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(HOSTILE_FILES) and all("refused" in line for line in lines)
    peak = max(float(line.split("peak RSS ")[1].split(" MiB")[0]) for line in lines)
    assert peak < 2048, done.stdout


@pytest.mark.parametrize("text, expected", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
               for p, c in zip("abcdefg", "bcdefgh")), "expands to more than"),
    ("# padding\n" * 8000, "larger than 64 KiB"),
], ids=["alias_bomb", "huge_file"])
def test_yaml_bombs_are_refused(capsys, record, data_root, tmp_path, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    line = fails(capsys, ulrl_args(record, data_root, "--yaml_path", tmp_path / "c.yaml"))
    assert expected in line and len(line) < 400
    assert_no_result(record)


# ---------------------------------------------------------------- 5 values

def _bd_test(**changes) -> dict:
    def edit(raw):
        state = copy.deepcopy(raw["bd_test"])
        data = state["bd_data_container"]["data_dict"]
        for key, value in changes.items():
            if key == "label":
                first = next(iter(data))
                data[first] = {**data[first], "other_info": [value, 1]}
            else:
                state[key] = value
        return state
    return edit


@pytest.mark.parametrize("change, expected", [
    (dict(model="running_var"), "negative BatchNorm variance"),
    (dict(bd_test=_bd_test(label=10)), "must be class indices 0..9, got 10"),
    (dict(bd_test=_bd_test(label=-1)), "must be class indices 0..9, got -1"),
    (dict(bd_test=_bd_test(original_index_array=np.array([0, 1, 1, 2]))), "repeats indices"),
    (dict(bd_test=_bd_test(original_index_array=np.array([0, 1, 2, 10**6]))),
     "must index its poison_indicator"),
], ids=["negative_running_var", "label_too_large", "negative_label", "repeated_index",
        "index_out_of_range"])
def test_bad_values_are_refused(capsys, record, data_root, change, expected):
    raw = torch.load(record / RECORD_FILE, weights_only=False)
    if change.get("model") == "running_var":
        state = smallcnn_state()
        name = next(k for k in state if k.endswith("running_var"))
        state[name][0] = -1.0
        edit_record(record, model=state)
    else:
        edit_record(record, bd_test=change["bd_test"](raw))
    line = fails(capsys, ulrl_args(record, data_root))
    assert expected in line
    assert_no_result(record, started=True)


@pytest.mark.parametrize("kind, expected", [
    (dict(bd_labels=(0, 0, 0, 12)), "must be class indices 0..9, got 12"),
    (dict(index=(0, 1, 2, 700)), "points outside the clean data (600 samples)"),
], ids=["label", "index"])
def test_bd_train_is_checked_before_the_defense(capsys, record, data_root, kind, expected):
    with_bd_train(record, **kind, num_train=1000)
    line = fails(capsys, ulrl_args(record, data_root, "--retune_check", "--retune_poison_ratio",
                                   "0.03"))  # 4 of 4 poisoned images chosen
    assert expected in line
    assert_no_result(record, started=True)


def test_non_finite_outputs_are_an_error_not_a_metric(capsys, record, data_root):
    state = smallcnn_state()
    state["linear.weight"][:] = 3e38  # finite weights whose logits overflow to inf
    edit_record(record, model=state)
    line = fails(capsys, ulrl_args(record, data_root))
    assert "outputs NaN or inf" in line
    assert_no_result(record, started=True)


# ---------------------------------------------------------------- 6 PNG only

@pytest.mark.parametrize("suffix, fmt", [(".eps", "EPS"), (".png", "JPEG"), (".gif", "GIF")])
def test_only_png_is_decoded(capsys, record, data_root, suffix, fmt):
    png = sorted((record / "bd_test_dataset").rglob("*.png"))[0]
    other = png.with_suffix(suffix)
    Image.new("L" if fmt != "EPS" else "L", (28, 28)).save(other, format=fmt)
    if suffix != ".png":
        png.unlink()
        raw = torch.load(record / RECORD_FILE, weights_only=False)
        for item in raw["bd_test"]["bd_data_container"]["data_dict"].values():
            item["path"] = item["path"].replace(png.name, other.name)
        edit_record(record, bd_test=raw["bd_test"])
    line = fails(capsys, ulrl_args(record, data_root))
    assert f"cannot decode image {other}" in line and "damaged" in line
    assert_no_result(record, started=True)


# ---------------------------------------------------------------- 7 allowlist, protocols, numbers

@pytest.mark.parametrize("build", [
    lambda: Payload(np.dtype, "O"), lambda: Payload(np.dtype, [("a", "i4"), ("b", "O")]),
], ids=["dtype_O", "structured_with_object_field"])
def test_object_dtype_is_refused_however_built(capsys, record, data_root, build):
    edit_record(record, note=build())
    line = fails(capsys, ulrl_args(record, data_root))
    assert "object-dtype array" in line and "malicious" in line
    assert_no_result(record, started=True)


def test_image_without_state(capsys, record, data_root):
    edit_record(record, note=image_with_state(None))
    line = fails(capsys, ulrl_args(record, data_root))
    assert "PIL image without pixel data" in line
    assert_no_result(record, started=True)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_protocols_of_valid_records_load(tmp_path, protocol, legacy):
    folder = with_bd_train(tmp_path / "r")
    expected = load_attack_record(folder)
    raw = torch.load(folder / RECORD_FILE, weights_only=False)
    torch.save(raw, folder / RECORD_FILE, pickle_protocol=protocol,
               _use_new_zipfile_serialization=not legacy)
    loaded = load_attack_record(folder)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.state_dict.items())
    assert [img.tobytes() for img, *_ in loaded.bd_train.entries.values()] == \
        [img.tobytes() for img, *_ in expected.bd_train.entries.values()]
    assert np.array_equal(loaded.bd_test.order, expected.bd_test.order)


@pytest.mark.parametrize("option, value, expected", [
    ("--threads", "100000", "--threads must be in [0, 1024]"),
    ("--threads", "-1", "--threads must be in [0, 1024]"),
    ("--seed", "-1", "--seed must be in [0, 4294967295]"),
    ("--curve_samples", "-1", "--curve_samples must be >= 0"),
    ("--eval_batch_size", "-7", "--eval_batch_size must be >= 0"),
    ("--clip_norm", "-1", "--clip_norm must be >= 0"),
    ("--unlearning_milestones", "-3", "--unlearning_milestones must be >= 0"),
    ("--tag", "t" * 300, "--tag must be letters, digits, . + - _ (at most 64)"),
    ("--tag", "../x", "--tag must be letters, digits, . + - _ (at most 64)"),
    ("--result_file", "r" * 300, "--result_file must be a record folder name"),
    ("--result_file", "../r", "--result_file must be a record folder name"),
], ids=lambda v: v if len(v) < 20 else v[:5])
def test_command_line_numbers(capsys, record, data_root, option, value, expected):
    argv = ulrl_args(record, data_root)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    line = fails(capsys, argv)
    assert line.startswith("error: ") and expected in line
    assert "damaged" not in line and "malicious" not in line  # the command line is to blame
    assert_no_result(record)
