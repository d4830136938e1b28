"""Model registry: every module in this folder registers its builders with
`@register_model(name, classifier="dotted.name")`.

A builder is `fn(num_classes: int, in_channels: int, image_size: int) -> nn.Module`; it sets no global
state and is deterministic given `torch.manual_seed`. `classifier` names the final nn.Linear with
`num_classes` outputs, the layer ULRL scores and the defenses prune or reinitialize. Adding a model
means adding one file here: the package imports every module in its folder when it is first imported.

Models of another library are a family, built on request under a prefix (`register_family`):
`timm/<name>` for timm's models (models/timm_models.py; timm is optional).

Nothing here downloads anything: weights come only from a local file (`weights_path` when training,
`read_state_dict` + `load_aligned` for a model to defend: a state dict or .safetensors, wrapper prefixes handled).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from typing import Callable

import torch
from torch import nn

from utils.core.errors import UserError, shown

__all__ = ["register_model", "register_family", "model_names", "declared_classifier",
           "build_model", "find_classifier", "input_channels", "load_weights",
           "strip_module_prefix", "read_state_dict", "load_aligned", "build_for_weights"]

Builder = Callable[[int, int, int], nn.Module]
_REGISTRY: dict[str, Builder] = {}
_CLASSIFIERS: dict[str, str | None] = {}  # model name -> dotted name of its classifier
# prefix ('timm/') -> (builder(name after the prefix, num_classes, in_channels, image_size),
# classifier(model) -> dotted name): models another library names, built on request
_FAMILIES: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], str]]] = {}


def register_model(name: str, classifier: str | None = None):
    """Decorator: register `fn(num_classes, in_channels, image_size) -> nn.Module` under `name`,
    with `classifier` the dotted name of its final nn.Linear (None: found by structure)."""
    key = name.lower()

    def deco(fn: Builder) -> Builder:
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"model name {name!r} is registered twice "
                             f"({_REGISTRY[key].__module__} and {fn.__module__})")
        _REGISTRY[key] = fn
        _CLASSIFIERS[key] = classifier
        return fn

    return deco


def register_family(prefix: str, build: Callable[..., nn.Module],
                    classifier: Callable[[nn.Module], str]) -> None:
    """Models named `<prefix><name>` (e.g. 'timm/resnet18'): `build(name, num_classes,
    in_channels, image_size)` validates the name against its library and builds the model;
    `classifier(model)` gives its classifier's dotted name."""
    _FAMILIES[prefix.lower()] = (build, classifier)


def _family(name: str | None):
    key = str(name).lower()
    return next(((p, f) for p, f in _FAMILIES.items() if key.startswith(p)), (None, None))


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def declared_classifier(model_name: str | None) -> str | None:
    """The classifier's dotted name the registry declares for `model_name` (None if not declared
    or not a registered model)."""
    return _CLASSIFIERS.get(str(model_name).lower()) if model_name else None


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                weights_path: str | os.PathLike | None = None) -> nn.Module:
    """Build a registered model; optionally load pretrained weights from a LOCAL state-dict file.

    A pretrained file whose classifier has another shape (e.g. 1000 ImageNet classes) loads every
    weight except the classifier, which keeps its fresh initialization.
    """
    key = str(name).lower()
    prefix, family = _family(key)
    if key not in _REGISTRY and family is None:
        raise UserError(f"unknown model '{shown(name, 60)}': choose one of "
                        f"{', '.join(model_names())}, or "
                        f"{' '.join(p + '<name>' for p in _FAMILIES)}")
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}: check the data set's class count")
    if int(in_channels) < 1:
        raise UserError(f"in_channels must be >= 1, got {in_channels}: use 1 (grey) or 3 (RGB)")
    if family is not None:
        model = family[0](str(name)[len(prefix):], int(num_classes), int(in_channels),
                          int(image_size))
    else:
        model = _REGISTRY[key](int(num_classes), int(in_channels), int(image_size))
    if weights_path is not None:
        _load_pretrained(model, key, int(num_classes), weights_path)
    return model


# ---------------------------------------------------------------- classifier lookup

def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _describe_linears(model: nn.Module, keep: int = 12) -> str:
    layers = [f"{n} ({m.in_features}->{m.out_features})" for n, m in _linear_layers(model)]
    if not layers:
        return "the model has no nn.Linear layer"
    if len(layers) > keep:
        return (f"Linear layers: ... {len(layers) - keep} earlier, then "
                + ", ".join(layers[-keep:]))
    return "Linear layers: " + ", ".join(layers)


def find_classifier(model: nn.Module, num_classes: int, name: str | None = None,
                    model_name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier layer: `name` (dotted path, e.g. 'classifier.6', '1.heads.head') if given,
    else the one the registry declares for `model_name`, else (a model registered without one, or
    built elsewhere) the last nn.Linear (registration order) with `out_features == num_classes`."""
    if name:
        return name, _named_linear(model, name, "pass --linear_name as one of the")
    family = _family(model_name)[1]
    declared = declared_classifier(model_name) or (family[1](model) if family else None)
    if declared:
        layer = _named_linear(model, declared, f"model '{model_name}' declares its classifier as "
                                               f"{declared!r}; pass --linear_name as one of the")
        if layer.out_features != num_classes:
            raise UserError(f"the classifier {declared!r} of model '{model_name}' has "
                            f"{layer.out_features} outputs, not {num_classes}: the record's "
                            f"num_classes disagrees with its weights, or pass --linear_name")
        return declared, layer
    found = [(n, m) for n, m in _linear_layers(model) if m.out_features == num_classes]
    if not found:
        raise UserError(f"no nn.Linear layer with {num_classes} outputs found: pass --linear_name "
                        f"with the classifier's dotted name; {_describe_linears(model)}")
    return found[-1]


def _named_linear(model: nn.Module, name: str, advice: str) -> nn.Linear:
    """The nn.Linear at dotted path `name`; else a UserError ending in `advice` + the layers."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"layer {name!r} not found in the model: {advice} "
                        f"{_describe_linears(model)}") from None
    if not isinstance(layer, nn.Linear):
        raise UserError(f"layer {name!r} is a {type(layer).__name__}, not an nn.Linear: {advice} "
                        f"{_describe_linears(model)}")
    return layer


# ---------------------------------------------------------------- state dicts

def strip_module_prefix(state_dict) -> dict:
    """Drop the 'module.' prefixes that DataParallel (possibly nested) adds to every key."""
    out = {}
    for key, value in state_dict.items():
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def input_channels(state_dict) -> int:
    """Input channel count a model expects: in_channels of its first 4-D floating-point weight."""
    for key, value in state_dict.items():
        if (torch.is_tensor(value) and value.dim() == 4 and value.is_floating_point()
                and str(key).endswith("weight")):
            return int(value.shape[1])
    raise UserError("the weights contain no 4-D convolution weight, so the input channel count is "
                    "unknown: check that the file holds a convolutional model's state dict")


def _diff(model_sd: dict, sd: dict) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = []
    for k, v in sd.items():
        if k in model_sd:
            if not torch.is_tensor(v):
                shapes.append(f"{k} (not a tensor: {type(v).__name__})")
            elif tuple(v.shape) != tuple(model_sd[k].shape):
                shapes.append(f"{k} {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}")
    return missing, unexpected, shapes


def _some(items: list[str], n: int = 5) -> str:
    head = ", ".join(items[:n])
    return head + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _mismatch_text(missing, unexpected, shapes) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_some(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {_some(shapes)}")
    return "; ".join(parts)


def load_weights(model: nn.Module, state_dict) -> None:
    """Strict load after stripping 'module.' (DataParallel) prefixes; a mismatch is a UserError."""
    sd = strip_module_prefix(state_dict)
    missing, unexpected, shapes = _diff(model.state_dict(), sd)
    if missing or unexpected or shapes:
        raise UserError(f"the weights do not fit the {type(model).__name__} model ("
                        f"{_mismatch_text(missing, unexpected, shapes)}): the record's model_name "
                        f"or num_classes may be wrong, or the weights come from another "
                        f"architecture")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied into a parameter
        raise UserError(f"the weights do not load into the {type(model).__name__} model "
                        f"({shown(e)}): the record is damaged") from None


# Nested checkpoints: {'state_dict': ...} (Lightning), {'model': ...}, {'model_state_dict': ...}
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
# Key prefixes of wrappers: DataParallel / DDP ('module.'), torch.compile ('_orig_mod.')
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path, option: str = "--weights_path") -> dict:
    """The tensors of a LOCAL weights file: `.safetensors`, or a torch.save'd state dict (or a
    checkpoint dict holding one under CHECKPOINT_KEYS) read with weights_only=True, which refuses
    pickled code. `option` names the flag in error messages."""
    if not os.path.isfile(path):
        raise UserError(f"weights file {str(path)!r} not found: give {option} as an existing "
                        f"local state-dict file (nothing is downloaded)")
    try:
        if str(path).endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise UserError(f"{option} {str(path)!r} is a .safetensors file, which needs the "
                                "safetensors package: pip install safetensors") from None
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read weights file {str(path)!r} ({shown(first)}): save it with "
                        f"torch.save(model.state_dict(), path) or safetensors") from None
    if isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        for inner in CHECKPOINT_KEYS:
            if isinstance(obj.get(inner), dict):
                obj = obj[inner]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"weights file {str(path)!r} does not hold a state dict of tensors: save it "
                        f"with torch.save(model.state_dict(), path)")
    problem = state_dict_problem(obj)
    if problem:
        raise UserError(f"weights file {str(path)!r}: entry '{shown(problem[0])}' {problem[1]}")
    return obj


def state_dict_problem(sd: dict) -> tuple[str, str] | None:
    """(key, what is wrong) of the first entry that is not a usable weight: a name mapped to a
    dense real tensor, finite, with BatchNorm variances >= 0; None when all are."""
    for key, value in sd.items():
        if not isinstance(key, str) or not torch.is_tensor(value) or \
                value.layout != torch.strided or value.is_complex() or value.is_quantized:
            return shown(key), "is not a name with a dense real tensor"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return key, "holds NaN or inf values (not finite): the weights are broken"
        if key.endswith("running_var") and bool((value < 0).any()):
            return key, "holds a negative BatchNorm variance: the weights are broken"
    return None


def _strip_wrappers(sd: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            return _strip_wrappers({k[len(prefix):]: v for k, v in sd.items()})
    return sd


def _align_prefix(sd: dict, model_keys: list[str]) -> dict:
    """The keys of `sd` made to meet the model's when none do as they are: wrapper prefixes
    (WRAPPER_PREFIXES) dropped, then a prefix the model adds (e.g. '1.' for Sequential(Resize,
    vit)) added, or one the file adds (e.g. Lightning's 'model.') dropped."""
    if any(k in sd for k in model_keys):
        return sd
    sd = _strip_wrappers(sd)
    if any(k in sd for k in model_keys):
        return sd
    first = next(iter(sd))
    for mk in model_keys:
        if mk.endswith("." + first):
            prefix = mk[: len(mk) - len(first)]
            moved = {prefix + k: v for k, v in sd.items()}
            if any(k in moved for k in model_keys):
                return moved
        if first.endswith("." + mk) and all(k.startswith(first[:-len(mk)]) for k in sd):
            moved = {k[len(first) - len(mk):]: v for k, v in sd.items()}
            if any(k in moved for k in model_keys):
                return moved
    return sd


FILE_ADVICE = ("check --model, --num_classes and the input channels, or the weights come from "
               "another architecture")
RECORD_ADVICE = ("the record's model_name or num_classes may be wrong, or the weights come from "
                 "another architecture")


def load_aligned(model: nn.Module, state_dict: dict, where: str) -> None:
    """Load a file's state dict (read_state_dict) into `model`, its keys aligned (_align_prefix);
    a mismatch is one UserError naming `where` and listing what differs."""
    sd = _align_prefix(state_dict, list(model.state_dict()))
    _check_fit(model, sd, where)
    load_weights(model, sd)


def _check_fit(model: nn.Module, sd: dict, where: str, advice: str = FILE_ADVICE) -> None:
    missing, unexpected, shapes = _diff(model.state_dict(), sd)
    if missing or unexpected or shapes:
        raise UserError(f"{where} do not fit the {type(model).__name__} model ("
                        f"{_mismatch_text(missing, unexpected, shapes)}): {advice}")


@contextlib.contextmanager
def _without_storage():
    """Modules built inside hold their parameters and buffers on the meta device: shapes without
    memory. (Not a torch.device('meta') context: some builders compute layer widths with tensors,
    which must stay real.)"""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, \
            register_buffer


def build_for_weights(name: str, num_classes: int, in_channels: int, image_size: int,
                      state_dict: dict, where: str, advice: str = FILE_ADVICE) -> nn.Module:
    """The model `name` with `state_dict` loaded. Weights someone else made name the model, so
    the fit is checked on a storage-free build first: a small file naming a huge architecture
    (e.g. vit_h_14, 2.5 GB) is refused without allocating it."""
    skeleton_args = (name, num_classes, in_channels, image_size)
    with _without_storage():
        skeleton = build_model(*skeleton_args)
    sd = _align_prefix(state_dict, list(skeleton.state_dict()))
    _check_fit(skeleton, sd, where, advice)
    del skeleton
    model = build_model(*skeleton_args)
    load_weights(model, sd)
    return model


def _load_pretrained(model: nn.Module, name: str, num_classes: int, path) -> None:
    model_sd = model.state_dict()
    sd = _align_prefix(strip_module_prefix(read_state_dict(path)), list(model_sd))
    cls_name, _ = find_classifier(model, num_classes, model_name=name)
    cls_keys = {f"{cls_name}.weight", f"{cls_name}.bias"}
    # a classifier trained on another class count (e.g. ImageNet's 1000) is left freshly initialized
    if any(k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape) for k in cls_keys):
        sd = {k: v for k, v in sd.items() if k not in cls_keys}
    missing, unexpected, shapes = _diff(model_sd, sd)
    missing = [k for k in missing if k not in cls_keys or any(c in sd for c in cls_keys)]
    if missing or unexpected or shapes:
        raise UserError(f"pretrained weights {str(path)!r} do not fit model {name!r} ("
                        f"{_mismatch_text(missing, unexpected, shapes)}): use weights of the same "
                        f"architecture and input channel count")
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------- auto-registration

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
