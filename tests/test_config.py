"""Defaults < yaml < command line; unknown or mistyped keys are errors; --print_config shows
the resolved values and their sources."""
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from defense.ulrl import OPTIONS
from tests.helpers import HANG_GUARD_S
from utils.core.config import Option, config_sources, parse_config
from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    return parse_config(OPTIONS, "test", argv)


def test_defaults_are_the_public_codes():
    cfg = parse([])
    assert (cfg.unlearning_lr, cfg.clean_threshold, cfg.tau, cfg.ht) == (0.01, 0.2, 3.5, 2)
    assert (cfg.unlearning_epochs, cfg.relearn_epochs, cfg.batch_size, cfg.ratio) == (20, 20, 128, 0.01)
    assert cfg.unlearning_milestones == [10, 20] and cfg.clip_norm == 20.0
    assert cfg.trust_record is False and cfg.eval_every_epoch is False


def test_yaml_then_command_line(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("relearn_lr: 0.001\nalpha: 0.5\ntau: 3\nunlearning_milestones: [5, 8]\n")
    cfg = parse(["--yaml_path", str(yml), "--alpha", "0.9"])
    assert cfg.relearn_lr == 0.001  # from the yaml
    assert cfg.alpha == 0.9  # command line wins
    assert cfg.tau == 3.0 and isinstance(cfg.tau, float)  # yaml int coerced to float
    assert cfg.unlearning_milestones == [5, 8]
    assert parse(["--yaml_path", str(yml), "--unlearning_milestones", "2", "4"]).unlearning_milestones == [2, 4]


def test_shipped_yaml_files_parse_with_the_papers_values():
    cfg = parse(["--yaml_path", str(ROOT / "config/defense/ulrl/cifar10.yaml")])
    assert (cfg.relearn_lr, cfg.alpha) == (0.005, 0.7)
    for name in ("gtsrb", "cifar100", "tiny"):
        cfg = parse(["--yaml_path", str(ROOT / f"config/defense/ulrl/{name}.yaml")])
        assert (cfg.relearn_lr, cfg.alpha) == (0.001, 0.001)
    for path in (ROOT / "config/defense/ulrl").glob("*.yaml"):
        parse(["--yaml_path", str(path)])  # every shipped file is valid


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("relearn_lrr: 0.001\n")
    with pytest.raises(UserError, match="unknown key 'relearn_lrr'.*did you mean 'relearn_lr'"):
        parse(["--yaml_path", str(yml)])


def test_mistyped_yaml_value_is_an_error(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("unlearning_epochs: lots\n")
    with pytest.raises(UserError, match="'unlearning_epochs' must be int"):
        parse(["--yaml_path", str(yml)])


def test_bad_yaml_and_missing_yaml(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        parse(["--yaml_path", str(yml)])
    with pytest.raises(UserError, match="not found"):
        parse(["--yaml_path", str(tmp_path / "missing.yaml")])


def test_unknown_command_line_flag_exits(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--relearn_lrr", "0.1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --relearn_lrr" in capsys.readouterr().err


def test_booleans_parse_correctly():
    assert parse(["--trust_record"]).trust_record is True
    assert parse(["--eval_every_epoch", "false"]).eval_every_epoch is False  # not type=bool's True
    assert parse(["--amp", "False"]).amp is False
    with pytest.raises(SystemExit):
        parse(["--amp", "maybe"])


def test_choices_enforced(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("no_flag_action: retry\n")
    with pytest.raises(UserError, match="must be one of finetune, top, stop"):
        parse(["--yaml_path", str(yml)])


def test_bounds_are_checked_after_yaml_and_command_line_merge(tmp_path):
    options = {"rate": Option(0.5, "a share", bounds="(0, 1]"),
               "steps": Option(1, "a count", bounds=">= 1"),
               "cuts": Option([0.5], "shares", nargs="+", bounds="[0, 1)")}
    assert parse_config(options, "t", ["--rate", "1", "--cuts", "0", "0.9"]).cuts == [0.0, 0.9]
    for argv, message in ((["--rate", "0"], "--rate must be in (0, 1], got 0.0"),
                          (["--steps", "0"], "--steps must be >= 1, got 0"),
                          (["--cuts", "0.2", "1"], "--cuts must be in [0, 1), got [0.2, 1.0]")):
        with pytest.raises(UserError, match=re.escape(message)):
            parse_config(options, "t", argv)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: -3\n")
    with pytest.raises(UserError, match="--steps must be >= 1, got -3"):
        parse_config(options, "t", ["--yaml_path", str(bad)])
    # a bad yaml value the command line overrides is fine: the merged value is what runs
    assert parse_config(options, "t", ["--yaml_path", str(bad), "--steps", "2"]).steps == 2


def test_sources_say_where_each_value_came_from(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("relearn_lr: 0.001\nalpha: 0.5\n")
    cfg = parse(["--yaml_path", str(yml), "--alpha", "0.9"])
    sources = config_sources(cfg)
    assert sources["tau"] == "default" and sources["relearn_lr"] == f"yaml {yml}"
    assert sources["alpha"] == "command line" and sources["yaml_path"] == "command line"
    assert set(sources) == set(vars(cfg))  # one source per value
    assert "sources" not in vars(cfg)  # cfg itself stays the plain values
    assert config_sources(SimpleNamespace(tau=1)) == {}  # a hand-made namespace has none


def print_config_lines(capsys, argv) -> dict[str, tuple[str, str]]:
    """--print_config's output as {key: (value, source)}; it exits 0."""
    with pytest.raises(SystemExit) as e:
        parse([*argv, "--print_config"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    parsed = {}
    for line in lines:
        key, rest = line.split(":", 1)
        value, source = rest.rsplit("  # ", 1)
        parsed[key] = (value.strip(), source)
    return parsed


def test_print_config_shows_values_and_sources(tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("relearn_lr: 0.001\nalpha: 0.5\nunlearning_milestones: [5, 8]\n")
    shown = print_config_lines(capsys, ["--yaml_path", str(yml), "--alpha", "0.9"])
    assert list(shown) == [*OPTIONS, "yaml_path"]  # every key, in the table's order
    assert shown["tau"] == ("3.5", "default")
    assert shown["relearn_lr"] == ("0.001", f"yaml {yml}")
    assert shown["unlearning_milestones"] == ("[5, 8]", f"yaml {yml}")
    assert shown["alpha"] == ("0.9", "command line")
    assert shown["result_file"] == ("null", "default") and shown["trust_record"][0] == "false"
    assert shown["yaml_path"] == (str(yml), "command line")
    assert print_config_lines(capsys, [])["yaml_path"] == ("null", "default")


def test_print_config_checks_the_config_first(tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("trust_record: true\n")
    with pytest.raises(UserError, match="only be given on the command line"):
        parse(["--yaml_path", str(yml), "--print_config"])
    assert capsys.readouterr().out == ""


ENTRY_POINTS = sorted((ROOT / "defense").glob("*.py")) + sorted((ROOT / "attack").glob("*.py"))


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_entry_point_prints_its_config_without_running(path, capsys):
    module = importlib.import_module(f"{path.parent.name}.{path.stem}")
    with pytest.raises(SystemExit) as e:
        module.main(["--print_config", "--seed", "3"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [*module.OPTIONS, "yaml_path"]
    assert any(line.startswith("seed:") and line.endswith("# command line") for line in lines)


def test_print_config_runs_without_a_record(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "defense/ulrl.py"), "--print_config",
                           "--record_dir", str(tmp_path / "none"), "--result_file", "missing"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0 and done.stderr == ""
    assert "result_file:" in done.stdout and "missing" in done.stdout
    assert not (tmp_path / "none").exists()  # nothing was made
