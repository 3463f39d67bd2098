"""Tests for shared/model.py: models, devices, weight exchange."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from shared.model import (
    autocast,
    build_model,
    count_parameters,
    get_weights,
    resolve_device,
    seed_everything,
    set_weights,
)


def _tiny_unet(seed=0, **kw):
    seed_everything(seed)
    return build_model("unet", channels=(4, 8), strides=(2,), num_res_units=1, **kw)


# --- build_model ------------------------------------------------------------------------


def test_default_unet_size_and_shape():
    model = build_model()
    assert 300_000 <= count_parameters(model) <= 500_000
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,x_shape",
    [
        ({"in_channels": 3}, (1, 3, 32, 32)),
        ({"name": "basic_unet"}, (1, 1, 32, 32)),
        ({"name": "basic_unet", "in_channels": 3}, (2, 3, 24, 40)),  # BasicUNet pads odd sizes
        ({"name": "basic_unet", "channels": (4, 4, 8, 8, 16, 4)}, (1, 1, 32, 32)),  # 6 features as given
        ({"channels": (8, 16), "strides": (2,), "num_res_units": 0, "dropout": 0.0}, (1, 1, 16, 16)),
    ],
)
def test_build_model_variants(kwargs, x_shape):
    model = build_model(**kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(*x_shape))
    assert out.shape == (x_shape[0], 1, *x_shape[2:])


def test_basic_unet_features_from_four_channels():
    # (c0, c1, c2, c3) -> BasicUNet features (c0, c0, c1, c2, c3, c0)
    model = build_model("basic_unet", channels=(4, 8, 16, 32))
    assert model.conv_0.conv_0.conv.out_channels == 4
    assert model.down_4.convs.conv_1.conv.out_channels == 32
    assert model.final_conv.in_channels == 4


def test_dropout_is_active_in_train_mode():
    model = build_model(dropout=0.5).train()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "resnet"}, r"unknown model name 'resnet'; valid names: unet, basic_unet"),
        ({"name": "basic_unet", "channels": (4, 8, 16)}, r"basic_unet needs 4 or 6 channels, got 3"),
    ],
)
def test_build_model_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


# --- weights ----------------------------------------------------------------------------


def test_weights_roundtrip_exact():
    src, dst = _tiny_unet(seed=0), _tiny_unet(seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    weights = get_weights(src)
    assert list(weights) == list(src.state_dict())
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    set_weights(dst, weights)
    for key, value in src.state_dict().items():
        got = dst.state_dict()[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key


def test_get_weights_returns_copies():
    model = _tiny_unet()
    weights = get_weights(model)
    key = next(iter(weights))
    before = model.state_dict()[key].clone()
    weights[key] += 1.0
    assert torch.equal(model.state_dict()[key], before)


def test_set_weights_accepts_tensors_and_keeps_model_dtype():
    src, dst = _tiny_unet(seed=0), _tiny_unet(seed=1)
    # float64 tensors (e.g. an average computed in double) are copied into the float32 model
    set_weights(dst, {k: v.double() for k, v in src.state_dict().items()})
    for key, value in src.state_dict().items():
        assert dst.state_dict()[key].dtype == torch.float32
        assert torch.equal(dst.state_dict()[key], value), key


def test_set_weights_keeps_integer_buffers():
    # BatchNorm carries an int64 num_batches_tracked buffer
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))

    src, dst = net(), net()
    src.train()(torch.randn(2, 1, 5, 5))
    weights = get_weights(src)
    assert weights["1.num_batches_tracked"].dtype == np.int64
    set_weights(dst, weights)
    assert dst.state_dict()["1.num_batches_tracked"].dtype == torch.int64
    assert dst.state_dict()["1.num_batches_tracked"].item() == 1
    assert torch.equal(dst.state_dict()["1.running_mean"], src.state_dict()["1.running_mean"])


def test_set_weights_wrong_shape_names_key_and_shapes():
    model = _tiny_unet()
    weights = get_weights(model)
    key = list(weights)[3]
    good_shape = weights[key].shape
    weights[key] = np.zeros((*good_shape, 2), dtype=np.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(f"{key!r} has shape {(*good_shape, 2)}")) as err:
        set_weights(model, weights)
    assert str(tuple(good_shape)) in str(err.value)
    # nothing was loaded
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_set_weights_missing_or_unknown_key_raises():
    model = _tiny_unet()
    weights = get_weights(model)
    first = next(iter(weights))
    missing = {k: v for k, v in weights.items() if k != first}
    with pytest.raises(ValueError, match=re.escape(f"weights lack key {first!r}")):
        set_weights(model, missing)
    with pytest.raises(ValueError, match=re.escape("weights have key 'extra.weight'")):
        set_weights(model, {**weights, "extra.weight": np.zeros(1)})


@pytest.mark.parametrize("name", ["unet", "basic_unet"])
def test_flower_array_record_roundtrip(name):
    from flwr.app import ArrayRecord

    seed_everything(0)
    if name == "unet":
        src = build_model(channels=(4, 8), strides=(2,), num_res_units=1)
    else:
        src = build_model("basic_unet", channels=(2, 2, 4, 4, 8, 2))
    state = src.state_dict()
    back = ArrayRecord(state).to_torch_state_dict()
    _assert_same_state(back, state)
    seed_everything(1)
    dst = build_model(channels=(4, 8), strides=(2,), num_res_units=1) if name == "unet" else build_model(
        "basic_unet", channels=(2, 2, 4, 4, 8, 2)
    )
    set_weights(dst, back)
    _assert_same_state(dst.state_dict(), state)


def test_flower_array_record_keeps_integer_buffers():
    from flwr.app import ArrayRecord

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    net(torch.randn(2, 1, 5, 5))
    state = net.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    _assert_same_state(ArrayRecord(state).to_torch_state_dict(), state)


def _assert_same_state(back, state):
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key


def test_count_parameters():
    model = torch.nn.Linear(3, 2)  # 3*2 weights + 2 biases = 8
    assert count_parameters(model) == 8
    model.bias.requires_grad_(False)  # only trainable ones count
    assert count_parameters(model) == 6


# --- devices, precision, seeds ----------------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.mark.parametrize("spec,expected", [("cpu", "cpu"), pytest.param("auto", "cpu", marks=no_cuda)])
def test_resolve_device(spec, expected):
    assert resolve_device(spec) == torch.device(expected)


@no_cuda
def test_resolve_device_cuda_without_cuda_raises():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("spec", ["gpu", "", "cuda:0"])
def test_resolve_device_unknown_raises(spec):
    with pytest.raises(ValueError, match="valid values: auto, cpu, cuda"):
        resolve_device(spec)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_autocast_is_noop_on_cpu(device):
    model = _tiny_unet().eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with autocast(device):
            out = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_lowers_precision_on_cuda():
    model = _tiny_unet().cuda()
    with autocast("cuda"):
        out = model(torch.randn(1, 1, 16, 16, device="cuda"))
    assert out.dtype in (torch.bfloat16, torch.float16)


def test_seed_everything_is_reproducible():
    def draw():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first
