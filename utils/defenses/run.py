"""What every defense shares: its common options, loading the record with its model and data, the
defense subset, evaluation, and the output files in record/<name>/defense/<method>/."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import torch

from models import find_classifier
from utils.analysis.plots import write_plots
from utils.core.cli import environment, log, log_file, peak_memory_mib, require, seed_everything, \
    set_threads, setup_console_logging
from utils.core.config import Option, config_sources
from utils.core.errors import UserError, shown
from utils.core.io import write_csv, write_json, write_text
from utils.core.result_set import ResultSet, check_output_folder, seal
from utils.data.images import Preprocess
from utils.data.record import save_defense_result
from utils.defenses.retune import RETUNE_OPTIONS, retune_check, retune_set
from utils.defenses.session import DefenseSession
from utils.defenses.sources import BACKDOORBENCH_KEYS, MODEL_FILE_OPTIONS, load_source
from utils.training.train import resolve_device

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
                   bounds="[0, 4294967295]", aliases=("random_seed",)),  # numpy's seed range
    "ratio": Option(0.01, "share of the clean training set used as defense data", bounds="(0, 1]"),
    "defense_samples": Option(None, "number of clean training images used as defense data, "
                                    "instead of --ratio", int, bounds=">= 1",
                              conflicts=("ratio",)),
    "index": Option(None, "file of defense-subset indices (one per line) instead of --ratio", str,
                    conflicts=("ratio", "defense_samples")),
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
    "output_dir": Option(None, "write the results into <output_dir>/<method>/ (default: "
                               "<record>/defense/<method>/; required with --model_file)", str),
    **RETUNE_OPTIONS,
    **MODEL_FILE_OPTIONS,
    **BACKDOORBENCH_KEYS,
}


def backdoorbench_summary(epochs: list[dict], after: dict) -> list[dict]:
    """BackdoorBench's <method>_df_summary.csv, so that its analysis code reads ours: rows 'last'
    (the purified model), 'valid_max' (the largest value over the run's evaluations: the epochs
    evaluated with --eval_every_epoch, and the end) and 'exist_nan_value', one column per metric,
    fractions; the row names sit in a column without a header, as pandas writes an index."""
    series = {m: [row[m] for row in epochs if m in row] + [after[m]]
              for m in ("test_acc", "test_asr", "test_ra") if m in after}
    return [{"": "last", **{m: v[-1] for m, v in series.items()}},
            {"": "valid_max", **{m: max((x for x in v if x == x), default=float("nan"))
                                 for m, v in series.items()}},
            {"": "exist_nan_value", **{m: any(x != x for x in v) for m, v in series.items()}}]


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
    """Loads a record (or a model file and image folders: utils/defenses/sources.py) and
    everything a defense needs; writes the defense's outputs."""

    def __init__(self, cfg, method: str):
        setup_console_logging()
        require(re.fullmatch(r"[A-Za-z0-9_.+-]{0,64}", cfg.tag) is not None,
                f"--tag must be letters, digits, . + - _ (at most 64), got {shown(cfg.tag, 80)}")
        self.cfg, self.method = cfg, f"{method}_{cfg.tag}" if cfg.tag else method
        self.base_method = method
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.epochs: list[dict] = []  # one row per training epoch, for <method>_df.csv
        if cfg.model_file:
            require(bool(cfg.output_dir), "--model_file needs --output_dir, the folder for the "
                                          "results")
            require(Path(cfg.model_file).is_file(), f"--model_file {shown(cfg.model_file, 200)} "
                                                    "not found: pass an existing weights file")
            self.input = Path(cfg.model_file)
        else:
            self.input = self.folder = self._record_folder(cfg)
        # The results: <record>/defense/<method>, or <output_dir>/<method> (a folder the person
        # at the keyboard named, so it may be made with its parents).
        self.base, self.below = (Path(cfg.output_dir), ()) if cfg.output_dir else \
            (self.folder, ("defense",))
        self.final = self.base.joinpath(*self.below, self.method)
        if self.base.is_dir():
            check_output_folder(self.base, self.method, self.below)
        self.device = resolve_device(cfg.device)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)

    @staticmethod
    def _record_folder(cfg) -> Path:
        require(bool(cfg.result_file), "--result_file is required: the record folder name under "
                                       f"{cfg.record_dir}/ (or --model_file for a model without "
                                       "a record)")
        parts = cfg.result_file.split("/")
        require(len(cfg.result_file) <= 1024 and "\0" not in cfg.result_file
                and all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts),
                f"--result_file must be a record folder name (or name/name) under "
                f"{cfg.record_dir}/, at most 255 bytes a name, without '..', got "
                f"{shown(cfg.result_file, 80)}")
        folder = Path(cfg.record_dir) / cfg.result_file
        require((folder / "attack_result.pt").is_file(),
                f"no attack record at {folder / 'attack_result.pt'}: check --result_file and "
                "--record_dir (records live in record/<name>/attack_result.pt)")
        return folder

    def __enter__(self):
        # Everything is written into a fresh stage folder, swapped into place when the run ends
        # well (utils/core/result_set.py): a failed run leaves the previous result as it was.
        self._made_base = not self.base.exists()
        try:
            self.base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --output_dir {self.base} ({e.strerror}): choose a "
                            "writable folder") from None
        try:
            self._result = ResultSet(self.base, self.method, self.below).__enter__()
        except BaseException:
            self._remove_made_base()
            raise
        self.out = self._result.stage
        self._log = log_file(self.out / f"{self.method}.log")
        try:
            self._log.__enter__()
            self._load()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _remove_made_base(self):
        """A failed run leaves no trace: not even the --output_dir it created (if still empty)."""
        if self._made_base:
            try:
                self.base.rmdir()
            except OSError:
                pass

    def __exit__(self, *exc):
        if exc[0] is not None and issubclass(exc[0], UserError):
            log.error("%s", exc[1])
            exc[1].logged = True
        try:
            self._log.__exit__(*exc)
        finally:
            self._result.__exit__(*exc)
            if exc[0] is not None:
                self._remove_made_base()

    def _load(self):
        cfg, t0 = self.cfg, time.perf_counter()
        log.info("%s on %s %s (device %s)", self.method.upper(),
                 "model file" if cfg.model_file else "record", self.input, self.device)
        src = self.source = load_source(cfg, self.device, self.base_method)
        self.record, self.model, self.original = src.record, src.model, src.original
        if cfg.compile:
            self.model.compile()  # in place: parameter names and the classifier stay the same
        self.linear_name, self.linear = find_classifier(self.model, src.num_classes,
                                                        cfg.linear_name, src.model_name)
        require(len(src.subset_index) >= src.num_classes,
                f"the defense subset has {len(src.subset_index)} images, fewer than the "
                f"{src.num_classes} classes: raise --ratio or --defense_samples, or list more "
                "indices in --index")
        self.subset_index = src.subset_index
        # The model decides the channel count (read from its weights); data are converted to it.
        channels = src.channels
        self.defense_data = src.clean_train.subset(self.subset_index).with_channels(channels)
        self.clean_test = src.clean_test.with_channels(channels)
        self.bd_test = None if src.bd_test is None else src.bd_test.with_channels(channels)
        self.defense_data, self.clean_test = (d.to(self.device)
                                              for d in (self.defense_data, self.clean_test))
        if self.bd_test is not None:
            self.bd_test = self.bd_test.to(self.device)
        if cfg.retune_check:  # built now, so that a record it cannot use fails before the defense
            self.retune_set = retune_set(self.record, src.clean_train, self.defense_data, cfg,
                                         channels)
        self.preprocess = Preprocess(src.mean, src.std, channels, hflip=src.hflip)
        self.test_sets, self.curve_sets = (self.clean_test, self.bd_test), None
        if cfg.curve_samples > 0:  # the same images after every epoch, so curves are comparable
            gen = torch.Generator().manual_seed(cfg.seed)
            self.curve_sets = tuple(
                None if d is None else
                d.subset(torch.randperm(len(d), generator=gen)[:cfg.curve_samples].to(self.device))
                for d in self.test_sets)
        log.info("model %s (%d input channels, classifier '%s' %s), data %s from %s: %d defense "
                 "images; C-ACC on %s; %s", src.model_name, channels, self.linear_name,
                 tuple(self.linear.weight.shape), src.dataset, src.data_folder,
                 len(self.defense_data), src.test_set,
                 "no trigger given, so no ASR / RA" if self.bd_test is None else
                 f"{len(self.bd_test)} backdoor test images")
        self.times["load"] = time.perf_counter() - t0

    def finish(self, before: dict, after: dict, details: dict) -> dict:
        """Write the result set into the stage: defense_result.pt, the retuning check's outcome,
        <method>_df.csv, index.txt, <method>_df_summary.csv (BackdoorBench's layout),
        <method>_before_after.csv, plots, then the sealed summary.json.
        Leaving the run's `with` block publishes them together."""
        src, cfg = self.source, self.cfg
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_defense_result(self.out / "defense_result.pt", model_name=src.model_name,
                            num_classes=src.num_classes, state_dict=state)
        if cfg.retune_check:  # on a copy of the model
            details = {**details, "retune": self.timed("retune", retune_check, self)}
        self.times["total"] = time.perf_counter() - self.start
        summary = {
            "method": self.method, "record": None if cfg.model_file else str(self.folder),
            "model_file": cfg.model_file, "dataset": src.dataset, "data_folder": src.data_folder,
            "model": src.model_name, "classifier": self.linear_name,
            "defense_samples": len(self.defense_data), "test_set": src.test_set,
            "test_samples": len(self.clean_test) + len(self.bd_test or ()),
            "before": before, "after": after, **details,
            "times_s": {k: round(v, 3) for k, v in self.times.items()},
            "peak_memory_mib": peak_memory_mib(self.device),
            "config": dict(vars(cfg)), "config_sources": config_sources(cfg),
            "environment": environment(self.device),
        }
        write_csv(self.out / f"{self.method}_df.csv", self.epochs)
        write_text(self.out / "index.txt", "".join(f"{i}\n" for i in self.subset_index))
        write_csv(self.out / f"{self.method}_df_summary.csv",
                  backdoorbench_summary(self.epochs, after))
        write_csv(self.out / f"{self.method}_before_after.csv",
                  [{"model": "backdoored", **before}, {"model": self.method, **after}])
        if cfg.plots:
            write_plots(self.out, summary)
        summary = seal(self.out, summary)  # last: it covers every other file of the set
        write_json(self.out / "summary.json", summary)
        log.info("%-10s %8s %8s %8s", "", "C-ACC", "ASR", "RA")
        for name, m in (("before", before), ("after", after)):
            log.info("%-10s %s", name, " ".join(
                f"{100 * m[k]:7.2f}%" if k in m else f"{'n/a':>8}"
                for k in ("test_acc", "test_asr", "test_ra")))
        log.info("results in %s (%.1f s)", self.final, self.times["total"])
        return summary

