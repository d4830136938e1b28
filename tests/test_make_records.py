"""sh/make_records.sh: one command per attack file, per-dataset yaml with a default fallback."""
import subprocess
from pathlib import Path

from tests.helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def make_records(*args):
    return subprocess.run(["bash", str(ROOT / "sh/make_records.sh"), *args], capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def test_dry_run_lists_one_command_per_attack_with_the_dataset_yaml():
    done = make_records("--dry-run", "--dataset", "fashion_mnist", "--model", "smallcnn")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    attacks = sorted(p.stem for p in (ROOT / "attack").glob("*.py") if not p.stem.startswith("_"))
    assert len(lines) == len(attacks)
    for attack, line in zip(attacks, lines):
        yaml = ROOT / f"config/attack/{attack}/fashion_mnist.yaml"
        expected = yaml if yaml.exists() else ROOT / f"config/attack/{attack}/default.yaml"
        assert f"attack/{attack}.py --yaml_path {expected} " in line
        assert f"--save_folder_name {attack}_fashion_mnist_smallcnn" in line


def test_dataset_without_its_own_yaml_falls_back_to_default_and_extra_args_pass_through():
    done = make_records("--dry-run", "--dataset", "gtsrb", "--attacks", "badnet", "--",
                        "--device", "cuda:1")
    assert done.returncode == 0, done.stderr
    assert "config/attack/badnet/default.yaml --dataset gtsrb" in done.stdout
    assert done.stdout.strip().endswith("--device cuda:1")


def test_unknown_attack_is_reported_and_fails():
    done = make_records("--attacks", "no_such_attack")
    assert done.returncode == 1
    assert "no_such_attack: no attack/no_such_attack.py" in done.stdout
