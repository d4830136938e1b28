"""Configuration as plain values: built-in defaults, overridden by a yaml file, overridden by the
command line. Every key is declared once with its type, so a mistyped key in the yaml or on the
command line is an error instead of a silently ignored setting. The option tables are the only place
a default is stated; `--print_config` shows the resolved values and where each came from."""
from __future__ import annotations

import argparse
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from utils.core.cli import DEBUG_FLAG
from utils.core.errors import UserError, shown

NO_YAML = "none"  # --yaml_path none: the option tables' defaults, no yaml picked for the data
YAML_MAX_BYTES = 64 * 1024  # the shipped configs are under 1 KiB
YAML_MAX_NODES = 10_000  # values after alias expansion: aliases can nest into billions


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    type: type | None = None  # inferred from the default when omitted
    choices: tuple | None = None
    nargs: str | None = None  # '+' for lists
    conflicts: tuple[str, ...] = ()  # options that must not be set together with this one
    bounds: str | None = None  # allowed range of a number (or of every item of a list), checked
    # after yaml and command line are merged: "> 0", ">= 1", "<= 1", "[0, 1]", "(0, 1]", "[0, 1)"
    command_line_only: bool = False  # a safety switch: only the person at the keyboard sets it
    aliases: tuple[str, ...] = ()  # other names of the key (BackdoorBench's, e.g. 'wd')
    ignored: bool = False  # accepted (another tool's configs carry it) but not used: value as given

    @property
    def value_type(self):
        if self.type is not None:
            return self.type
        if isinstance(self.default, (list, tuple)) and self.default:
            return type(self.default[0])
        return type(self.default) if self.default is not None else str


def parse_bool(text) -> bool:
    """'true/false/1/0/yes/no' -> bool (argparse's type=bool turns 'False' into True)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(kind: type, value):
    """One value to `kind`, refusing conversions that would silently change it."""
    if isinstance(value, bool) and kind is not bool:
        raise TypeError("a boolean")
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is int and isinstance(value, float):
        raise TypeError("not a whole number")  # int(2.5) would truncate without a word
    if kind is str and not isinstance(value, (str, int, float)):
        raise TypeError("not a scalar")
    if isinstance(value, kind):
        return value
    return parse_bool(value) if kind is bool else kind(value)


def _coerce(key: str, option: Option, value, source: str):
    if value is None:
        return None
    if option.ignored:  # kept as given, as summary.json can hold it (yaml also makes dates)
        plain = (str, int, float, bool)
        ok = isinstance(value, plain) or isinstance(value, list) and all(
            isinstance(v, plain) for v in value)
        return value if ok else shown(value, 200)
    kind = option.value_type
    try:
        if option.nargs:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            value = [_convert(kind, v) for v in items]
        else:
            value = _convert(kind, value)
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"{source}: '{key}' must be {kind.__name__}, "
                        f"got {shown(repr(value), 80)}") from e
    for item in value if isinstance(value, list) else [value]:
        # inf passes range checks such as "lr > 0" and nan poisons every later computation;
        # torch's seeds and sizes are 64-bit. Refuse them here, not deep inside a run.
        if isinstance(item, float) and not math.isfinite(item):
            raise UserError(f"{source}: '{key}' must be a finite number, got {item!r}")
        if isinstance(item, int) and not -2**63 <= item < 2**63:
            raise UserError(f"{source}: '{key}' must fit in 64 bits, got {item}")
    if option.choices and value not in option.choices:
        raise UserError(f"{source}: '{key}' must be one of {', '.join(map(str, option.choices))}, "
                        f"got {shown(repr(value), 80)}")
    return value


_COMPARE = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


def within(value, bounds: str) -> bool:
    """Is the number `value` inside `bounds` (a comparison such as '>= 1' or an interval such as
    '(0, 1]')?"""
    value = float(value)
    if bounds[0] in "[(":
        low, high = (float(v) for v in bounds[1:-1].split(","))
        return (value >= low if bounds[0] == "[" else value > low) and \
            (value <= high if bounds[-1] == "]" else value < high)
    op, limit = bounds.split()
    return _COMPARE[op](value, float(limit))


def check_bounds(options: dict[str, Option], values: dict) -> None:
    for key, option in options.items():
        value = values.get(key)
        if option.bounds is None or value is None:
            continue
        rule = f"in {option.bounds}" if option.bounds[0] in "[(" else option.bounds
        for item in value if isinstance(value, list) else [value]:
            if not within(item, option.bounds):
                raise UserError(f"--{key} must be {rule}, got {value}")


def option_names(options: dict[str, Option]) -> dict[str, str]:
    """Every name a key may be given by (the key itself and its aliases) -> the key."""
    names = {key: key for key in options}
    for key, option in options.items():
        names.update(dict.fromkeys(option.aliases, key))
    return names


def _unknown_key_error(key: str, known, source: str) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{source}: unknown key '{key}'{hint}; known keys: {', '.join(sorted(known))}")


def _expanded_nodes(data, limit: int) -> int:
    """How many values `data` holds with every alias expanded, counting up to limit + 1 only."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def load_yaml(path, options: dict[str, Option]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing --yaml_path "
                        "(e.g. config/defense/ulrl/cifar10.yaml)")
    with path.open("rb") as file:
        raw = file.read(YAML_MAX_BYTES + 1)
    if len(raw) > YAML_MAX_BYTES:
        raise UserError(f"config file {path} is larger than {YAML_MAX_BYTES // 1024} KiB, far more "
                        "than a config needs: pass the right --yaml_path")
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid yaml: {shown(e, 300)}") from e
    if _expanded_nodes(data, YAML_MAX_NODES) > YAML_MAX_NODES:
        raise UserError(f"config file {path} expands to more than {YAML_MAX_NODES:,} values "
                        "(nested aliases): a config is a flat list of key: value")
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    names, values, given_as = option_names(options), {}, {}
    for name, value in data.items():
        if name not in names:
            raise _unknown_key_error(shown(name, 60), names, f"config file {path}")
        key = names[name]
        if options[key].command_line_only:
            raise UserError(f"config file {path}: '{name}' can only be given on the command line "
                            "(a config file must not switch off a safety check); remove it")
        if key in given_as:
            raise UserError(f"config file {path}: '{given_as[key]}' and '{name}' are the same "
                            "setting: keep one")
        given_as[key] = name
        if value is not None:  # an empty value (BackdoorBench's "from the record") is the default
            values[key] = _coerce(key, options[key], value, f"config file {path}")
    return values


def _command_line_bool(text) -> bool:
    """parse_bool for argparse, whose own message would name the function ('invalid parse_bool
    value')."""
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}, use true or false") from e


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (not usage + message), exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help for the options\n")


def _check_conflicts(options: dict[str, Option], given: dict, source: str) -> None:
    for key, option in options.items():
        for other in option.conflicts:
            if given.get(key) is not None and given.get(other) is not None:
                raise UserError(f"{source}: '{key}' and '{other}' cannot be used together: "
                                f"keep one of them")


class Config(SimpleNamespace):
    """The resolved values, read as attributes. Where each came from ('default', 'yaml <path>',
    'command line') is kept in the slot `sources`, outside the instance dict, so that vars(cfg)
    stays the plain values that summaries store and code reads."""
    __slots__ = ("sources", "options")


def config_sources(cfg) -> dict[str, str]:
    """Where each value of `cfg` came from; empty for a namespace not made by parse_config (tests
    build their own)."""
    return dict(cfg.sources) if isinstance(cfg, Config) else {}


def print_config(cfg: Config, out=None) -> None:
    """One line per key: `key: value  # source`, values as yaml writes them."""
    width = max(len(key) for key in vars(cfg))
    for key, value in vars(cfg).items():
        shown_value = yaml.safe_dump(value, default_flow_style=True, width=10**6)
        shown_value = shown_value.removesuffix("\n...\n").strip()
        print(f"{key + ':':<{width + 1}} {shown_value:<12}  # {cfg.sources[key]}",
              file=out or sys.stdout)


def parse_config(options: dict[str, Option], description: str, argv=None) -> Config:
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--yaml_path", help="yaml file of defaults; the command line overrides it "
                                            f"('{NO_YAML}': the option defaults only; a defense "
                                            "without it picks its data set's yaml)")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, print the full traceback instead of one line")
    parser.add_argument("--print_config", action="store_true",
                        help="print every resolved value and where it came from (default, yaml, "
                             "command line), then exit without running")
    for key, option in options.items():
        kind = option.value_type
        kwargs = dict(default=None, help=f"{option.help} (default: {option.default})")
        if option.nargs:
            kwargs["nargs"] = option.nargs
        if option.ignored:
            kind = str
        if kind is bool:  # "--flag" alone means true; "--flag false" also works
            kwargs.update(type=_command_line_bool, nargs="?", const=True,
                          metavar="{true,false}")
        else:
            kwargs["type"] = kind
        if option.choices:
            kwargs["choices"] = option.choices
        parser.add_argument(f"--{key}", *(f"--{a}" for a in option.aliases), dest=key, **kwargs)
    args = parser.parse_args(argv)

    values = {key: option.default for key, option in options.items()}
    sources = dict.fromkeys(values, "default")
    if args.yaml_path and args.yaml_path != NO_YAML:
        from_yaml = load_yaml(args.yaml_path, options)
        _check_conflicts(options, from_yaml, f"config file {args.yaml_path}")
        values.update(from_yaml)
        sources.update(dict.fromkeys(from_yaml, f"yaml {args.yaml_path}"))
    command_line = {key: _coerce(key, option, getattr(args, key), "command line")
                    for key, option in options.items() if getattr(args, key) is not None}
    _check_conflicts(options, command_line, "command line")
    values.update(command_line)
    sources.update(dict.fromkeys(command_line, "command line"))
    check_bounds(options, values)
    values["yaml_path"] = args.yaml_path
    sources["yaml_path"] = "command line" if args.yaml_path else "default"
    cfg = Config(**values)
    cfg.sources, cfg.options = sources, options
    if args.print_config:  # like --help: the answer, then exit before anything runs
        print_config(cfg)
        sys.exit(0)
    return cfg


def apply_yaml(cfg: Config, path: Path, why: str) -> None:
    """Fill the values of `cfg` that are still defaults from the yaml `path` (the command line
    keeps precedence): how a run without --yaml_path picks up the shipped yaml for its data set
    and model. `why` says how the file was chosen; it goes into the sources."""
    from_yaml = load_yaml(path, cfg.options)
    _check_conflicts(cfg.options, from_yaml, f"config file {path}")
    for key, value in from_yaml.items():
        if cfg.sources.get(key) == "default":
            setattr(cfg, key, value)
            cfg.sources[key] = f"yaml {path} ({why})"
    check_bounds(cfg.options, vars(cfg))
    cfg.yaml_path, cfg.sources["yaml_path"] = str(path), why


def config_from(options: dict[str, Option], values: dict, source: str) -> Config:
    """The config of a call from Python (the defenses' purify()): the option table's defaults
    overridden by keyword `values`, checked as the command line is (unknown keys with a hint,
    types, choices, conflicts, bounds)."""
    names = option_names(options)
    for key in values:
        if key not in names:
            raise _unknown_key_error(shown(key, 60), names, source)
    given = {names[key]: _coerce(names[key], options[names[key]], value, source)
             for key, value in values.items()}
    _check_conflicts(options, given, source)
    merged = {key: option.default for key, option in options.items()} | given
    check_bounds(options, merged)
    cfg = Config(**merged, yaml_path=None)
    cfg.sources = {**dict.fromkeys(merged, "default"), **dict.fromkeys(given, source),
                   "yaml_path": "default"}
    cfg.options = options
    return cfg
