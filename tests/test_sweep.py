"""The sweep scripts: record x defense pairs through the dry run (yaml choice, resuming, one job
per GPU, tags, the SLURM task list), and one real tiny sweep that runs and then resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import HANG_GUARD_S, tiny_record
from utils.core.result_set import seal

ROOT = Path(__file__).resolve().parents[1]
DEFENSES = sorted(p.stem for p in (ROOT / "defense").glob("*.py") if not p.stem.startswith("_"))
ULRL_YAML = str(ROOT / "config/defense/ulrl/fashion_mnist.yaml")


def sh(script, *args, path_dirs=(), env=None):
    path = os.pathsep.join([*map(str, path_dirs), str(Path(sys.executable).parent),
                            os.environ["PATH"]])
    return subprocess.run(["bash", str(ROOT / "sh" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "PATH": path, **(env or {})})


def fake_record(root, name, dataset="fashion_mnist", model="smallcnn"):
    """What the sweep looks at: attack_result.pt exists, attack_summary.json names the data."""
    (root / name).mkdir(parents=True)
    (root / name / "attack_result.pt").write_bytes(b"")
    (root / name / "attack_summary.json").write_text(json.dumps(
        {"attack": "badnet", "dataset": dataset, "model": model}))


def finished(root, name, method, sealed=True):
    """A result folder as a run of this tool leaves it (sealed), or as a record could ship it."""
    folder = root / name / "defense" / method
    folder.mkdir(parents=True)
    (folder / "defense_result.pt").write_bytes(b"weights")
    m = {"test_acc": 0.9, "test_asr": 0.9, "test_ra": 0.1}
    summary = {"method": method, "record": str(root / name), "before": m, "after": m,
               "times_s": {"total": 1.0}}
    (folder / "summary.json").write_text(json.dumps(seal(folder, summary) if sealed else summary))


def commands(done):
    return [line for line in done.stdout.splitlines() if line and not line.startswith("#")]


def test_dry_run_lists_every_pair_with_its_yaml(tmp_path):
    fake_record(tmp_path, "a")
    fake_record(tmp_path, "b")
    done = sh("sweep.sh", "--record_dir", tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = commands(done)
    assert len(lines) == 2 * len(DEFENSES)  # every defense/*.py, discovered
    for record in ("a", "b"):
        for method in DEFENSES:
            assert sum(f"/defense/{method}.py --result_file {record} " in line
                       for line in lines) == 1
    ulrl = [line for line in lines if "/defense/ulrl.py" in line]
    assert all(f"--yaml_path {ULRL_YAML}" in line for line in ulrl)
    assert not any("CUDA_VISIBLE_DEVICES" in line for line in lines)  # no GPU here
    assert not (tmp_path / "a/defense").exists()  # a dry run writes nothing


def test_finished_pairs_are_skipped_unless_forced(tmp_path):
    fake_record(tmp_path, "a")
    finished(tmp_path, "a", "ulrl")
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--dry-run")
    assert commands(done) == [] and "(existing; --force reruns)" in done.stdout
    forced = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--dry-run", "--force")
    assert len(commands(forced)) == 1


def test_one_job_per_gpu(tmp_path):
    fake_record(tmp_path, "a")
    fake_record(tmp_path, "b")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: x)'\n"
                                        "echo 'GPU 1: H100 (UUID: y)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--dry-run",
              path_dirs=[bin_dir])
    lines = commands(done)
    assert [line.split()[0] for line in lines] == ["CUDA_VISIBLE_DEVICES=0",
                                                   "CUDA_VISIBLE_DEVICES=1"]


def test_parallel_jobs_report_each_failure(tmp_path):
    fake_record(tmp_path, "a")  # empty attack_result.pt: the defense fails at once, clearly
    fake_record(tmp_path, "b")
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--jobs", "2")
    assert done.returncode == 1
    failed = sorted(line.split()[0] for line in done.stdout.splitlines() if "FAILED" in line)
    assert failed == ["a", "b"] and "truncated or corrupt" in done.stdout
    assert (tmp_path / "a/defense/ulrl_run.txt").is_file()


def test_tag_explicit_yaml_and_extra_arguments(tmp_path):
    fake_record(tmp_path, "a")
    finished(tmp_path, "a", "ulrl")  # the untagged result does not count for the tag
    done = sh("sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--tag", "sd",
              "--dry-run", "--", "--yaml_path", "my.yaml", "--dispersion", "sd")
    [line] = commands(done)
    assert line.endswith("--tag sd --yaml_path my.yaml --dispersion sd ")
    assert ULRL_YAML not in line


def test_ulrl_many_is_the_sweep_for_ulrl(tmp_path):
    fake_record(tmp_path, "a")
    done = sh("ulrl_many.sh", "--record_dir", tmp_path, "--dry-run", "a")
    [line] = commands(done)
    assert "/defense/ulrl.py --result_file a " in line


def test_a_pattern_without_records_fails(tmp_path):
    fake_record(tmp_path, "a")
    done = sh("sweep.sh", "--record_dir", tmp_path, "--dry-run", "a", "zzz*")
    assert done.returncode == 1
    assert "zzz*: no record matches" in done.stdout and len(commands(done)) > 1


def test_slurm_dry_run_and_array_task(tmp_path):
    fake_record(tmp_path, "a")
    fake_record(tmp_path, "b")
    done = sh("slurm_sweep.sh", "--record_dir", tmp_path, "--defenses", "ulrl", "--dry-run",
              "--sbatch", "--partition gpu")
    assert done.returncode == 0, done.stderr
    lines = commands(done)
    submit = lines[-1]
    assert submit.startswith("sbatch --job-name sweep --array 1-2 ")
    assert "--partition gpu " in submit and "/sh/slurm_sweep.sh --task " in submit
    assert sum("/defense/ulrl.py" in line for line in lines) == 2
    assert not Path(submit.split()[-1]).exists() and not (tmp_path / "slurm").exists()
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo first\necho second task\n")
    task = sh("slurm_sweep.sh", "--task", tasks, env={"SLURM_ARRAY_TASK_ID": "2"})
    assert task.returncode == 0 and task.stdout.splitlines()[-1] == "second task"


def test_slurm_task_lists_are_not_written_through_a_link(tmp_path):
    """A record folder named slurm that is a link (records come from others) would carry the task
    list, which the array tasks run, into a folder of its choosing: refused."""
    records, elsewhere, bin_dir = tmp_path / "records", tmp_path / "elsewhere", tmp_path / "bin"
    fake_record(records, "a")
    elsewhere.mkdir()
    (records / "slurm").symlink_to(elsewhere)
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    done = sh("slurm_sweep.sh", "--record_dir", records, "--defenses", "ulrl", "--sbatch",
              "--cpus-per-task 1", path_dirs=[bin_dir])
    assert done.returncode == 2 and "is a symbolic link" in done.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_real_tiny_sweep_runs_then_resumes(tmp_path):
    tiny_record(tmp_path / "r")  # no attack_summary.json: the data set is read from the record
    args = ["--record_dir", tmp_path, "--defenses", "ulrl", "r", "--", "--ratio", "0.002",
            "--unlearning_epochs", "1", "--relearn_epochs", "1", "--no_flag_action", "top",
            "--plots", "false"]
    done = sh("sweep.sh", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("r ") and "ASR" in done.stdout
    summary = json.loads((tmp_path / "r/defense/ulrl/summary.json").read_text())
    assert summary["config"]["yaml_path"] == ULRL_YAML
    assert (tmp_path / "r/defense/ulrl_run.txt").is_file()
    again = sh("sweep.sh", *args)
    assert again.returncode == 0 and "(existing; --force reruns)" in again.stdout
