"""Configuration as plain values: built-in defaults, overridden by a yaml file, overridden by the
command line. Every key is declared once with its type, so a mistyped key in the yaml or on the
command line is an error instead of a silently ignored setting."""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from utils.errors import UserError


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    type: type | None = None  # inferred from the default when omitted
    choices: tuple | None = None
    nargs: str | None = None  # '+' for lists

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


def _coerce(key: str, option: Option, value, source: str):
    if value is None:
        return None
    kind = option.value_type
    convert = parse_bool if kind is bool else kind
    try:
        if option.nargs:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            value = [convert(v) for v in items]
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            value = convert(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}") from e
    if option.choices and value not in option.choices:
        raise UserError(f"{source}: '{key}' must be one of {', '.join(map(str, option.choices))}, "
                        f"got {value!r}")
    return value


def _unknown_key_error(key: str, known, source: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{source}: unknown key '{key}'{hint}; known keys: {', '.join(sorted(known))}")


def load_yaml(path, options: dict[str, Option]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing --yaml_path "
                        "(e.g. config/defense/ulrl/cifar10.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid yaml: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    for key in data:
        if key not in options:
            raise _unknown_key_error(str(key), options, f"config file {path}")
    return {k: _coerce(k, options[k], v, f"config file {path}") for k, v in data.items()}


def parse_config(options: dict[str, Option], description: str, argv=None) -> SimpleNamespace:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--yaml_path", help="yaml file of defaults; the command line overrides it")
    for key, option in options.items():
        kind = option.value_type
        kwargs = dict(default=None, help=f"{option.help} (default: {option.default})")
        if option.nargs:
            kwargs["nargs"] = option.nargs
        if kind is bool:  # "--flag" alone means true; "--flag false" also works
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="{true,false}")
        else:
            kwargs["type"] = kind
        if option.choices:
            kwargs["choices"] = option.choices
        parser.add_argument(f"--{key}", **kwargs)
    args = parser.parse_args(argv)

    values = {key: option.default for key, option in options.items()}
    if args.yaml_path:
        values.update(load_yaml(args.yaml_path, options))
    for key, option in options.items():
        given = getattr(args, key)
        if given is not None:
            values[key] = _coerce(key, option, given, "command line")
    values["yaml_path"] = args.yaml_path
    return SimpleNamespace(**values)
