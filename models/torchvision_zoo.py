"""Every other torchvision classification model, under its torchvision name (`resnet50`,
`mobilenet_v3_large`, `convnext_tiny`, `swin_t`, `vit_b_32`, ...), built with `weights=None` (nothing
is downloaded; pretrained weights come only from a local file).

- The classifier is declared per family (the last nn.Linear, e.g. `fc`, `classifier.3`,
  `heads.head`), so ULRL scores and FST reinitializes the right layer.
- Another input channel count replaces the first convolution (same shape otherwise, fresh init).
- Architectures that need a given input size (ViT, MaxViT: 224) or a minimum one (Inception v3: 75,
  AlexNet: 63, ConvNeXt and DenseNet: 32) are built BackdoorBench's way, `Sequential(Resize, model)`
  (to that size, or to the image size when larger): their state-dict keys and classifier then start
  with `1.`. Auxiliary heads (GoogLeNet, Inception v3) are off: a defense trains on the main output.
  VGG's max-pools round up (ceil_mode, as vgg19_bn here), so 28x28 inputs reach the classifier.
- SqueezeNet is not registered: its classifier is a 1x1 convolution, not the nn.Linear whose rows
  the defenses score, prune or reinitialize.
resnet18, vgg19_bn and vit_b_16 keep their BackdoorBench forms (models/torchvision_models.py).
"""
from __future__ import annotations

import functools

import torchvision
from torch import nn

from . import register_model
from .torchvision_models import _same_conv

# family prefix -> dotted name of the classifier (the first matching prefix counts)
CLASSIFIERS = (
    ("resnet", "fc"), ("resnext", "fc"), ("wide_resnet", "fc"), ("regnet", "fc"),
    ("shufflenet", "fc"), ("googlenet", "fc"), ("inception", "fc"),
    ("vgg", "classifier.6"), ("alexnet", "classifier.6"), ("densenet", "classifier"),
    ("mobilenet_v2", "classifier.1"), ("mobilenet_v3", "classifier.3"),
    ("efficientnet", "classifier.1"), ("mnasnet", "classifier.1"), ("convnext", "classifier.2"),
    ("vit", "heads.head"), ("swin", "head"), ("maxvit", "classifier.5"),
)
# Input sides, as the Resize in front of the model: exactly this (the model fixes it) or at least
# this (smaller inputs shrink to nothing on the way to the classifier; torchvision's minimums)
EXACT_SIDE = (("vit", 224), ("maxvit", 224))
MIN_SIDE = (("inception", 75), ("alexnet", 63), ("convnext", 32), ("densenet", 32))
AUX_HEADS = ("googlenet", "inception_v3")
SKIPPED = ("squeezenet",)  # classifier is a convolution
EXPLICIT = ("resnet18", "vgg19_bn", "vit_b_16")  # registered in torchvision_models.py


def _family(name: str, table) -> str | None:
    return next((value for prefix, value in table if name.startswith(prefix)), None)


def build(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in AUX_HEADS:
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(name, **kwargs)
    if name.startswith("vgg"):
        for layer in model.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True
    if in_channels != 3:
        conv_name, conv = next((n, m) for n, m in model.named_modules()
                               if isinstance(m, nn.Conv2d))
        fresh = _same_conv(conv, in_channels)
        parent_name, _, attr = conv_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
    exact, least = _family(name, EXACT_SIDE), _family(name, MIN_SIDE)
    if exact or least:
        side = exact or max(least, image_size)
        model = nn.Sequential(torchvision.transforms.Resize((side, side), antialias=True), model)
    return model


def _register_all() -> None:
    for name in torchvision.models.list_models(module=torchvision.models):
        if name in EXPLICIT or name.startswith(SKIPPED):
            continue
        head = _family(name, CLASSIFIERS)  # None (a family added later): found by structure
        wrapped = _family(name, EXACT_SIDE + MIN_SIDE) is not None
        register_model(name, classifier=head and ("1." if wrapped else "") + head)(
            functools.partial(build, name))


_register_all()
