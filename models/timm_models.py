"""timm's models as `timm/<name>` (e.g. `timm/resnet18`, `timm/convnext_atto`,
`timm/vit_tiny_patch16_224`), when timm is installed (`pip install timm`: an optional dependency;
without it, naming one is an error saying so). Built with `pretrained=False` (nothing is downloaded), the data set's class count
and input channels, and the input side for the architectures that take one (ViTs); the classifier is
the module timm's `get_classifier()` returns."""
from __future__ import annotations

import difflib

from torch import nn

from utils.core.errors import UserError, shown

from . import register_family


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm/<name> models need timm, an optional dependency: pip install timm") \
            from None
    return timm


def build(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    timm = _timm()
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise UserError(f"timm has no model '{shown(name, 60)}'"
                        + (f" (did you mean {', '.join('timm/' + c for c in close)}?)" if close
                           else "") + ": see timm.list_models()")
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels)
    try:  # transformers fix their input side at build time; convolutional models take any
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def classifier(model: nn.Module) -> str:
    head = model.get_classifier()
    return next((n for n, m in model.named_modules() if m is head), "")


register_family("timm/", build, classifier)
