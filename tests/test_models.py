"""models/: registry, builders, classifier lookup, state-dict helpers (CPU, tiny forward passes)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import models
from models import (build_model, declared_classifier, find_classifier, input_channels,
                    load_weights, model_names, register_model)
from utils.core.errors import UserError

ALL = ["preactresnet18", "resnet18", "vgg19_bn", "vit_b_16", "smallcnn"]
CLASSIFIER = {"preactresnet18": "linear", "resnet18": "fc", "vgg19_bn": "classifier.6",
              "vit_b_16": "1.heads.head", "smallcnn": "linear"}


@functools.lru_cache(maxsize=None)
def _built(name: str, in_channels: int, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, in_channels=in_channels).eval()


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg.strip()
    return msg


def test_registry_lists_every_model():
    assert set(ALL) <= set(model_names())
    assert model_names() == sorted(model_names())


def test_unknown_model_lists_names():
    with pytest.raises(UserError) as e:
        build_model("resnet1000", 10)
    msg = _one_line(e)
    assert "resnet1000" in msg and all(n in msg for n in ALL)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_build_and_forward(name, in_channels):
    model = _built(name, in_channels)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert input_channels(model.state_dict()) == in_channels


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("name", ["preactresnet18", "smallcnn"])
def test_other_image_sizes(name, size):
    model = _built(name, 1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_vgg19_bn_runs_on_28px():
    with torch.no_grad():
        assert _built("vgg19_bn", 1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_builders_are_deterministic_given_the_seed():
    for name in ["preactresnet18", "smallcnn", "resnet18"]:
        torch.manual_seed(123)
        a = build_model(name, 10, 1).state_dict()
        torch.manual_seed(123)
        b = build_model(name, 10, 1).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_preactresnet18_matches_backdoorbench_layout():
    model = _built("preactresnet18", 3)
    keys = list(model.state_dict())
    assert keys[0] == "conv1.weight"
    assert "layer2.0.shortcut.0.weight" in keys
    assert {"linear.weight", "linear.bias"} <= set(keys)
    # BackdoorBench's PreActResNet18 has no BatchNorm after conv1 and none after layer4 (no `bn`),
    # which is what gives the standard 11,171,146 parameters; a `bn` group would add 1,024.
    assert {k.split(".")[0] for k in keys} == {"conv1", "layer1", "layer2", "layer3", "layer4",
                                              "linear"}
    assert "layer1.0.shortcut.0.weight" not in keys and "layer1.1.shortcut.0.weight" not in keys
    for layer in (2, 3, 4):
        assert f"layer{layer}.0.shortcut.0.weight" in keys
        assert f"layer{layer}.1.shortcut.0.weight" not in keys
    for part in ("bn1", "conv1", "bn2", "conv2"):
        assert f"layer3.1.{part}.weight" in keys
    assert sum(p.numel() for p in model.parameters()) == 11_171_146
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer4.0.shortcut.0.weight"].shape == (512, 256, 1, 1)
    assert sd["linear.weight"].shape == (10, 512)


def test_vit_b_16_keys_start_with_1():
    sd = _built("vit_b_16", 1).state_dict()
    assert all(k.startswith("1.") for k in sd)
    assert sd["1.heads.head.weight"].shape == (10, 768)
    assert sd["1.conv_proj.weight"].shape == (768, 1, 16, 16)


@pytest.mark.parametrize("name", ALL)
def test_find_classifier_default(name):
    model = _built(name, 3)
    found, layer = find_classifier(model, 10)
    assert found == CLASSIFIER[name]
    assert isinstance(layer, nn.Linear) and layer.out_features == 10
    assert layer is model.get_submodule(found)


@pytest.mark.parametrize("name", ALL)  # the zoo's torchvision models: check_zoo_model below
def test_every_registered_model_declares_its_classifier(name):
    declared = declared_classifier(name)
    assert declared, f"register_model({name!r}) names no classifier"
    for num_classes in (10, 7):
        model = _built(name, 3, num_classes)
        layer = model.get_submodule(declared)
        assert isinstance(layer, nn.Linear) and layer.out_features == num_classes
        assert find_classifier(model, num_classes, model_name=name) == (declared, layer)
        assert find_classifier(model, num_classes, model_name=name.upper())[0] == declared


def _two_heads(num_classes, in_channels, image_size):
    """A classifier followed by another Linear with as many outputs, where the structural guess
    (the last such Linear) is wrong."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, 6), nn.Linear(6, num_classes),
                         nn.Linear(num_classes, num_classes))


def test_declared_classifier_wins_over_the_structural_guess_and_linear_name_over_both():
    register_model("_test_two_heads", classifier="2")(_two_heads)
    try:
        model = build_model("_test_two_heads", 5, in_channels=1)
        assert find_classifier(model, 5)[0] == "3"  # no model name: the structural guess
        assert find_classifier(model, 5, model_name="_test_two_heads") == ("2", model[2])
        assert find_classifier(model, 5, "3", model_name="_test_two_heads")[0] == "3"
        with pytest.raises(UserError) as e:  # the declared layer must have num_classes outputs
            find_classifier(model, 6, model_name="_test_two_heads")
        assert "'2' of model '_test_two_heads' has 5 outputs, not 6" in _one_line(e)
    finally:
        models._REGISTRY.pop("_test_two_heads")
        models._CLASSIFIERS.pop("_test_two_heads")


def test_a_model_without_a_declared_classifier_falls_back_to_the_structure():
    register_model("_test_undeclared")(_two_heads)
    try:
        assert declared_classifier("_test_undeclared") is None
        model = build_model("_test_undeclared", 5, in_channels=1)
        assert find_classifier(model, 5, model_name="_test_undeclared")[0] == "3"
        assert find_classifier(model, 5, model_name="not_registered")[0] == "3"
    finally:
        models._REGISTRY.pop("_test_undeclared")
        models._CLASSIFIERS.pop("_test_undeclared")


def test_find_classifier_smallcnn_is_last_linear():
    model = _built("smallcnn", 1)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert find_classifier(model, 10)[0] == last == "linear"


def test_find_classifier_by_dotted_name():
    model = _built("vgg19_bn", 3)
    name, layer = find_classifier(model, 10, "classifier.6")
    assert name == "classifier.6" and layer is model.classifier[6]
    assert find_classifier(_built("vit_b_16", 3), 10, "1.heads.head")[0] == "1.heads.head"


def test_find_classifier_wrong_or_non_linear_name():
    model = _built("vgg19_bn", 3)
    with pytest.raises(UserError) as e:
        find_classifier(model, 10, "classifier.9")
    msg = _one_line(e)
    assert "classifier.9" in msg and "classifier.6" in msg and "classifier.0" in msg
    with pytest.raises(UserError) as e:
        find_classifier(model, 10, "features.0")
    msg = _one_line(e)
    assert "Conv2d" in msg and "classifier.6" in msg


def test_find_classifier_none_with_class_count():
    with pytest.raises(UserError) as e:
        find_classifier(_built("preactresnet18", 3), 7)
    msg = _one_line(e)
    assert "--linear_name" in msg and "linear (512->10)" in msg


def test_input_channels_without_conv():
    with pytest.raises(UserError):
        input_channels({"w": torch.zeros(3, 4), "b": torch.zeros(3)})


def test_load_weights_strips_module_prefix():
    src, dst = _built("smallcnn", 1), build_model("smallcnn", 10, 1)
    prefixed = {"module." + k: v for k, v in src.state_dict().items()}
    load_weights(dst, prefixed)
    sd = dst.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items())


def test_load_weights_mismatch_is_user_error():
    with pytest.raises(UserError) as e:
        load_weights(build_model("smallcnn", 10, 3), _built("preactresnet18", 3).state_dict())
    msg = _one_line(e)
    assert "missing" in msg and "unexpected" in msg and "model_name" in msg
    with pytest.raises(UserError) as e:  # same keys, other class count
        load_weights(build_model("smallcnn", 5, 1), _built("smallcnn", 1).state_dict())
    msg = _one_line(e)
    assert "linear.weight" in msg and "shape" in msg


def test_weights_path_loads(tmp_path):
    src = _built("smallcnn", 1)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model = build_model("smallcnn", 10, 1, weights_path=path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


def test_weights_path_missing_or_bad(tmp_path):
    with pytest.raises(UserError) as e:
        build_model("smallcnn", 10, 1, weights_path=tmp_path / "nope.pt")
    assert "nope.pt" in _one_line(e)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        build_model("smallcnn", 10, 1, weights_path=bad)
    other = tmp_path / "other.pt"  # 3-channel weights for a 1-channel model
    torch.save(_built("smallcnn", 3).state_dict(), other)
    with pytest.raises(UserError) as e:
        build_model("smallcnn", 10, 1, weights_path=other)
    assert "features.0.weight" in _one_line(e)


def test_weights_path_with_1000_classes_skips_classifier(tmp_path):
    torch.manual_seed(1)
    pre = build_model("resnet18", 1000)
    path = tmp_path / "imagenet.pt"
    torch.save({"module." + k: v for k, v in pre.state_dict().items()}, path)
    torch.manual_seed(2)
    fresh = build_model("resnet18", 10).state_dict()
    torch.manual_seed(2)
    model = build_model("resnet18", 10, weights_path=path)
    sd, psd = model.state_dict(), pre.state_dict()
    for k, v in sd.items():
        if k.startswith("fc."):
            assert v.shape[0] == 10 and torch.equal(v, fresh[k])
        else:
            assert torch.equal(v, psd[k]), k


def test_pretrained_bare_keys_get_wrapper_prefix():
    inner = _built("smallcnn", 1)
    wrapped = nn.Sequential(nn.Identity(), build_model("smallcnn", 10, 1))
    aligned = models._align_prefix(dict(inner.state_dict()), list(wrapped.state_dict()))
    load_weights(wrapped, aligned)
    assert torch.equal(wrapped[1].linear.weight, inner.linear.weight)


def test_register_model_adds_a_builder():
    @register_model("_test_tiny")
    def tiny(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, num_classes))

    try:
        assert "_test_tiny" in model_names()
        model = build_model("_test_tiny", 3, in_channels=2)
        assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)
    finally:
        models._REGISTRY.pop("_test_tiny")
        models._CLASSIFIERS.pop("_test_tiny")


# One model per torchvision family (models/torchvision_zoo.py), the smallest; `-m slow` builds all.
ZOO_FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
                "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
                "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet50",
                "resnext50_32x4d", "shufflenet_v2_x0_5", "swin_t", "swin_v2_t", "vgg11",
                "vit_b_32", "wide_resnet50_2"]


def check_zoo_model(name: str) -> None:
    """Grey 28x28 Fashion-MNIST-sized input, 7 classes: builds, runs, and its declared classifier is
    the nn.Linear with 7 outputs that find_classifier returns."""
    torch.manual_seed(0)
    model = build_model(name, 7, in_channels=1, image_size=28).eval()
    declared = declared_classifier(name)
    layer = model.get_submodule(declared)
    assert isinstance(layer, nn.Linear) and layer.out_features == 7
    assert find_classifier(model, 7, model_name=name) == (declared, layer)
    assert input_channels(model.state_dict()) == 1
    with torch.inference_mode():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", ZOO_FAMILIES)
def test_torchvision_family_builds_runs_and_declares_its_classifier(name):
    check_zoo_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in model_names() if n not in ALL])
def test_every_torchvision_model_builds_runs_and_declares_its_classifier(name):
    check_zoo_model(name)


def test_every_torchvision_classifier_is_registered_except_squeezenet():
    import torchvision
    listed = set(torchvision.models.list_models(module=torchvision.models))
    assert {n for n in listed if not n.startswith("squeezenet")} <= set(model_names())
    assert not any(n.startswith("squeezenet") for n in model_names())
    assert {n for n in ZOO_FAMILIES} <= listed


def test_every_model_builds_without_storage_and_the_families_match_a_real_build():
    """The storage-free build that checks weights before a real one (models.build_for_weights):
    every registered model builds with all parameters and buffers on the meta device (all 82
    in about 6 s), and for one model per family its keys and shapes are the real build's."""
    for name in model_names():
        with models._without_storage():
            skeleton = build_model(name, 10, 3, 32).state_dict()
        assert all(v.device.type == "meta" for v in skeleton.values()), name
        if name in ZOO_FAMILIES:
            real = build_model(name, 10, 3, 32).state_dict()
            assert {k: tuple(v.shape) for k, v in skeleton.items()} == \
                {k: tuple(v.shape) for k, v in real.items()}, name
