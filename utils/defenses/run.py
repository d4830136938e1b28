"""What every defense shares: its common options, loading the record with its model and data, the
defense subset, evaluation, and the output files in record/<name>/defense/<method>/."""
from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Callable

import torch

from models import find_classifier, input_channels
from utils.analysis.plots import write_plots
from utils.core.cli import environment, log, log_file, peak_memory_mib, require, seed_everything, \
    set_threads, setup_console_logging
from utils.core.config import Option, config_sources
from utils.core.errors import UserError, shown
from utils.core.io import write_csv, write_json, write_text
from utils.core.result_set import ResultSet, check_output_folder, seal
from utils.data.datasets import clean_split, get_dataset
from utils.data.images import Preprocess
from utils.data.record import load_attack_record, save_defense_result
from utils.defenses.retune import RETUNE_OPTIONS, retune_check, retune_set
from utils.defenses.session import DefenseSession
from utils.training.train import record_model, resolve_device

DEFENSE_OPTIONS = {
    "result_file": Option(None, "record folder name under --record_dir (required)", str),
    "record_dir": Option("record", "folder holding the attack records"),
    "dataset": Option(None, "data set; optional, must agree with the record's clean_data", str),
    "model": Option(None, "model; optional, must agree with the record's model_name", str),
    "dataset_path": Option("./data", "folder holding the clean data sets (<dataset_path>/<name>)"),
    "device": Option(None, "cpu, cuda or cuda:N; default cuda when available, else cpu", str),
    "threads": Option(0, "CPU threads for torch (0: the cores this process may use)",
                      bounds="[0, 1024]"),
    "seed": Option(0, "seed for the defense subset, shuffling, augmentation and reinitialization",
                   bounds="[0, 4294967295]"),  # numpy's seed range
    "ratio": Option(0.01, "share of the clean training set used as defense data", bounds="(0, 1]"),
    "index": Option(None, "file of defense-subset indices (one per line) instead of --ratio", str,
                    conflicts=("ratio",)),
    "batch_size": Option(128, "training batch size", bounds=">= 1"),
    "eval_batch_size": Option(0, "evaluation batch size (0: 1024 on CUDA, 256 on CPU)",
                              bounds=">= 0"),
    "linear_name": Option(None, "dotted name of the classifier layer; default: the one the model "
                                "registry declares", str),
    "amp": Option(True, "bf16 autocast on CUDA (ignored on CPU)"),
    "compile": Option(False, "torch.compile the model (pays a one-off compile time)"),
    "loader": Option("tensor", "how training batches are made: 'tensor' (device-resident data, "
                               "augmentation on tensors) or 'dataloader' (a plain per-sample "
                               "torch DataLoader, the reference the fast path is checked against)",
                     choices=("tensor", "dataloader")),
    "curve_samples": Option(0, "per-epoch curves: after every epoch, evaluate a fixed random "
                               "subsample of this many clean and backdoor test images (0: off)",
                            bounds=">= 0"),
    "eval_every_epoch": Option(False, "evaluate the full clean and backdoor test sets after every "
                                      "epoch (the public code's schedule; slow)"),
    "tag": Option("", "write into defense/<method>_<tag>/ instead of defense/<method>/ (variants, "
                      "e.g. ablations, side by side)"),
    "plots": Option(True, "write PNG charts into the output folder (needs matplotlib; without it "
                          "a warning)"),
    "trust_record": Option(False, "UNSAFE: let the record unpickle arbitrary objects (runs code "
                                  "from whoever made it); only for records you made yourself; "
                                  "command line only", command_line_only=True),
    **RETUNE_OPTIONS,
}


def select_subset(n: int, cfg) -> list[int]:
    """The defense subset: `ratio` of the clean training set drawn uniformly with a seeded
    random.sample (as the public code), or the indices listed in --index."""
    if cfg.index:
        path = Path(cfg.index)
        require(path.is_file(), f"index file {path} not found: pass an existing --index file")
        try:
            idx = [int(line) for line in path.read_text().split()]
        except ValueError as e:
            raise UserError(f"index file {path} must hold one integer per line ({e})") from e
        require(len(idx) > 0, f"index file {path} is empty")
        require(len(set(idx)) == len(idx), f"index file {path} repeats indices")
        require(min(idx) >= 0 and max(idx) < n,
                f"index file {path} has indices outside 0..{n - 1} of the clean training set")
        return idx
    k = int(n * cfg.ratio)
    require(k > 0, f"--ratio {cfg.ratio} selects no sample of {n}: raise it")
    return random.Random(cfg.seed).sample(range(n), k)


def run_defense(cfg, method: str, defend: Callable[[DefenseSession], dict]) -> dict:
    """The skeleton every defense runs on: load the record, evaluate the backdoored model, purify
    it, evaluate again, write the result set. `defend(session)` is the defense's algorithm: it
    changes session.model in place (timing its phases with session.timed) and returns the details
    for summary.json; the Python API runs the same function (utils/defenses/session.py)."""
    with DefenseRun(cfg, method) as run:
        before = run.timed("evaluation_before", run.evaluate)
        details = defend(run)
        after = run.timed("evaluation_after", run.evaluate)
        return run.finish(before, after, details)


class DefenseRun(DefenseSession):
    """Loads a record and everything a defense needs; writes the defense's outputs."""

    def __init__(self, cfg, method: str):
        setup_console_logging()
        require(bool(cfg.result_file), "--result_file is required: the record folder name under "
                                       f"{cfg.record_dir}/")
        parts = cfg.result_file.split("/")
        require(len(cfg.result_file) <= 1024 and "\0" not in cfg.result_file
                and all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts),
                f"--result_file must be a record folder name (or name/name) under "
                f"{cfg.record_dir}/, at most 255 bytes a name, without '..', got "
                f"{shown(cfg.result_file, 80)}")
        require(re.fullmatch(r"[A-Za-z0-9_.+-]{0,64}", cfg.tag) is not None,
                f"--tag must be letters, digits, . + - _ (at most 64), got {shown(cfg.tag, 80)}")
        self.cfg, self.method = cfg, f"{method}_{cfg.tag}" if cfg.tag else method
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.epochs: list[dict] = []  # one row per training epoch, for <method>_df.csv
        self.folder = Path(cfg.record_dir) / cfg.result_file
        require((self.folder / "attack_result.pt").is_file(),
                f"no attack record at {self.folder / 'attack_result.pt'}: check --result_file and "
                "--record_dir (records live in record/<name>/attack_result.pt)")
        self.final = check_output_folder(self.folder, self.method)
        self.device = resolve_device(cfg.device)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)

    def __enter__(self):
        # Everything is written into a fresh stage folder, swapped into place when the run ends
        # well (utils/core/result_set.py): a failed run leaves the previous result as it was.
        self._result = ResultSet(self.folder, self.method).__enter__()
        self.out = self._result.stage
        self._log = log_file(self.out / f"{self.method}.log")
        try:
            self._log.__enter__()
            self._load()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and issubclass(exc[0], UserError):
            log.error("%s", exc[1])
            exc[1].logged = True
        try:
            self._log.__exit__(*exc)
        finally:
            self._result.__exit__(*exc)

    def _load(self):
        cfg, t0 = self.cfg, time.perf_counter()
        log.info("%s on record %s (device %s)", self.method.upper(), self.folder, self.device)
        record = self.record = load_attack_record(self.folder, trust=cfg.trust_record)
        for key, given, actual in (("dataset", cfg.dataset, record.clean_data),
                                   ("model", cfg.model, record.model_name)):
            require(given is None or given == actual,
                    f"--{key} {given} disagrees with the record, which holds {key} '{actual}': "
                    f"drop --{key} or pick the matching record")
        spec = self.spec = get_dataset(record.clean_data)
        require(record.num_classes == spec.num_classes,
                f"record says {record.num_classes} classes but {spec.name} has {spec.num_classes}: "
                "the record was made on another data set; pick the matching record")
        channels = input_channels(record.state_dict)
        self.model = record_model(record, record.state_dict, spec, self.device)
        if cfg.compile:
            self.model.compile()  # in place: parameter names and the classifier stay the same
        self.linear_name, self.linear = find_classifier(self.model, record.num_classes,
                                                        cfg.linear_name, record.model_name)
        # Only the images the run uses are decoded: the whole test split (evaluated), the defense
        # subset and the retuning set's images of the training split.
        clean_train = clean_split(spec.name, cfg.dataset_path, train=True)
        clean_test = clean_split(spec.name, cfg.dataset_path, train=False).subset()
        bd_test = record.bd_test.images(clean_test)
        self.subset_index = select_subset(len(clean_train), cfg)
        require(len(self.subset_index) >= record.num_classes,
                f"the defense subset has {len(self.subset_index)} images, fewer than the "
                f"{record.num_classes} classes: raise --ratio or list more indices in --index")
        # The model decides the channel count (read from its weights); data are converted to it.
        self.defense_data = clean_train.subset(self.subset_index).with_channels(channels)
        self.clean_test = clean_test.with_channels(channels)
        self.bd_test = bd_test.with_channels(channels)
        self.defense_data, self.clean_test, self.bd_test = (
            d.to(self.device) for d in (self.defense_data, self.clean_test, self.bd_test))
        if cfg.retune_check:  # built now, so that a record it cannot use fails before the defense
            self.retune_set = retune_set(record, clean_train, self.defense_data, cfg, channels)
        self.preprocess = Preprocess(spec.mean, spec.std, channels, hflip=spec.hflip)
        self.test_sets, self.curve_sets = (self.clean_test, self.bd_test), None
        self.original = record.state_dict
        if cfg.curve_samples > 0:  # the same images after every epoch, so curves are comparable
            gen = torch.Generator().manual_seed(cfg.seed)
            self.curve_sets = tuple(
                d.subset(torch.randperm(len(d), generator=gen)[:cfg.curve_samples].to(self.device))
                for d in (self.clean_test, self.bd_test))
        log.info("model %s (%d input channels, classifier '%s' %s), data %s: %d defense, "
                 "%d clean test, %d backdoor test images", record.model_name, channels,
                 self.linear_name, tuple(self.linear.weight.shape), spec.name,
                 len(self.defense_data), len(self.clean_test), len(self.bd_test))
        self.times["load"] = time.perf_counter() - t0

    def finish(self, before: dict, after: dict, details: dict) -> dict:
        """Write the result set into the stage: defense_result.pt, the retuning check's outcome,
        <method>_df.csv, index.txt, <method>_df_summary.csv, plots, then the sealed summary.json.
        Leaving the run's `with` block publishes them together."""
        record, cfg = self.record, self.cfg
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_defense_result(self.out / "defense_result.pt", model_name=record.model_name,
                            num_classes=record.num_classes, state_dict=state)
        if cfg.retune_check:  # on a copy of the model
            details = {**details, "retune": self.timed("retune", retune_check, self)}
        self.times["total"] = time.perf_counter() - self.start
        summary = {
            "method": self.method, "record": str(self.folder), "dataset": record.clean_data,
            "model": record.model_name, "classifier": self.linear_name,
            "defense_samples": len(self.defense_data),
            "test_samples": len(self.clean_test) + len(self.bd_test),
            "before": before, "after": after, **details,
            "times_s": {k: round(v, 3) for k, v in self.times.items()},
            "peak_memory_mib": peak_memory_mib(self.device),
            "config": dict(vars(cfg)), "config_sources": config_sources(cfg),
            "environment": environment(self.device),
        }
        write_csv(self.out / f"{self.method}_df.csv", self.epochs)
        write_text(self.out / "index.txt", "".join(f"{i}\n" for i in self.subset_index))
        write_csv(self.out / f"{self.method}_df_summary.csv",
                  [{"model": "backdoored", **before}, {"model": self.method, **after}])
        if cfg.plots:
            write_plots(self.out, summary)
        summary = seal(self.out, summary)  # last: it covers every other file of the set
        write_json(self.out / "summary.json", summary)
        log.info("%-10s %8s %8s %8s", "", "C-ACC", "ASR", "RA")
        for name, m in (("before", before), ("after", after)):
            log.info("%-10s %7.2f%% %7.2f%% %7.2f%%", name, 100 * m["test_acc"],
                     100 * m["test_asr"], 100 * m["test_ra"])
        log.info("results in %s (%.1f s)", self.final, self.times["total"])
        return summary

