"""The MONAI 2D networks a consortium can train, and the checks on their settings.

A hospital often has a network already (a UNet, a SegResNet, a FlexibleUNet on an ImageNet
backbone). `model.name` picks it; the flat keys (channels, strides, num_res_units, dropout) keep
their meaning where the network has them; `model.args` passes any other constructor argument
through, checked against the constructor's signature at config load so that a typo is one line,
not a traceback in round 1. Every network is built 2D, with `in_channels` from the config and one
output channel (a logit map). Importing this module loads neither torch nor MONAI: a config on
UNet/BasicUNet without args never needs them to load.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Network:
    """A MONAI class and which flat ModelConfig keys set which of its arguments."""

    monai_class: str
    flat: dict = field(default_factory=dict)  # ModelConfig key -> constructor argument
    required: tuple[str, ...] = ()


NETWORKS = {
    "unet": Network("UNet", {"channels": "channels", "strides": "strides", "num_res_units": "num_res_units",
                             "dropout": "dropout"}),
    "basic_unet": Network("BasicUNet", {"channels": "features", "dropout": "dropout"}),
    "segresnet": Network("SegResNet", {"dropout": "dropout_prob"}),
    "attention_unet": Network("AttentionUnet", {"channels": "channels", "strides": "strides", "dropout": "dropout"}),
    "flexible_unet": Network("FlexibleUNet", {"dropout": "dropout"}, required=("backbone",)),
}
MODEL_NAMES = tuple(NETWORKS)
FIXED_ARGS = ("spatial_dims", "in_channels", "out_channels")
# FlexibleUNet(pretrained=True) downloads ImageNet weights: never at run time (model.pretrained_weights)
NO_DOWNLOAD = "pretrained"


def network_class(name: str):
    if name not in NETWORKS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    import monai.networks.nets as nets

    return getattr(nets, NETWORKS[name].monai_class)


def settable_args(name: str) -> list[str]:
    """Constructor arguments `model.args` may set: all but the fixed, the flat-key and the downloading ones."""
    params = inspect.signature(network_class(name).__init__).parameters.values()
    taken = set(FIXED_ARGS) | set(NETWORKS[name].flat.values()) | {NO_DOWNLOAD}
    return [p.name for p in params if p.name != "self" and p.name not in taken
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def backbones() -> list[str]:
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    return list(FLEXUNET_BACKBONE.register_dict)


def network_kwargs(name: str, in_channels: int, channels: Sequence[int], strides: Sequence[int],
                   num_res_units: int, dropout: float, args: Mapping | None = None) -> dict:
    """The constructor's keyword arguments: 2D, one logit channel, the flat keys, then `args`."""
    if name not in NETWORKS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    flat = {"channels": tuple(int(c) for c in channels), "strides": tuple(strides),
            "num_res_units": num_res_units, "dropout": dropout}
    if name == "basic_unet":
        flat["channels"] = _basic_unet_features(flat["channels"])
    kwargs = {"spatial_dims": 2, "in_channels": in_channels, "out_channels": 1}
    kwargs.update({arg: flat[key] for key, arg in NETWORKS[name].flat.items()})
    kwargs.update({k: _tuples(v) for k, v in (args or {}).items()})
    return kwargs


def _basic_unet_features(channels: tuple[int, ...]) -> tuple[int, ...]:
    """BasicUNet's 6 features: as given, or (c0, c0, c1, c2, c3, c0) from 4 channels."""
    if len(channels) == 4:
        return (channels[0], *channels, channels[0])
    if len(channels) == 6:
        return channels
    raise ValueError(f"basic_unet needs 4 or 6 channels, got {len(channels)}: {channels}")


def _tuples(value):
    """YAML lists as tuples, the form MONAI documents (e.g. norm: [group, {num_groups: 4}])."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def describe(model) -> str:
    """The configured network in one phrase, for error lines: `unet(in_channels=1, channels=[...], ...)`."""
    spec = NETWORKS.get(model.name)
    parts = [f"in_channels={model.in_channels}"]
    for key in (spec.flat if spec else ()):
        value = getattr(model, key)
        parts.append(f"{key}={list(value) if isinstance(value, tuple) else value}")
    parts += [f"{k}={v}" for k, v in (getattr(model, "args", None) or {}).items()]
    return f"{model.name}({', '.join(parts)})"


def config_problem(model) -> tuple[str, str] | None:
    """(key, what is wrong) for a ModelConfig whose network cannot be built as configured, else None.

    Builds the network only when it is not UNet/BasicUNet with the flat keys alone (that one
    always builds, and loading its YAML then stays free of torch)."""
    from shared.config import ModelConfig

    spec = NETWORKS[model.name]
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    if model.name not in ("unet", "basic_unet"):  # the flat keys they ignored stay ignored, as before
        for key in ("channels", "strides", "num_res_units"):
            if key not in spec.flat and getattr(model, key) != defaults[key]:
                return f"model.{key}", (f"does not apply to {model.name}; give {spec.monai_class}'s own "
                                        f"arguments under model.args (valid: {', '.join(settable_args(model.name))})")
    weights = getattr(model, "pretrained_weights", None)
    if weights is not None:
        if model.name != "flexible_unet":
            return "model.pretrained_weights", (f"applies to flexible_unet's backbone only; the weights of a whole "
                                                f"{model.name} go in base_checkpoint")
        if not Path(weights).is_file():
            return "model.pretrained_weights", f"{weights} is not a file (backbone weights are read from disk, never downloaded)"
    args = getattr(model, "args", None) or {}
    if model.name in ("unet", "basic_unet") and not args:
        return None
    valid = settable_args(model.name)
    flat_of = {arg: key for key, arg in spec.flat.items()}
    for key in args:
        where = f"model.args.{key}"
        if key == NO_DOWNLOAD:
            return where, (f"{spec.monai_class}(pretrained=...) downloads weights at run time; put the backbone "
                           "weights on disk and give model.pretrained_weights: PATH")
        if key in FIXED_ARGS:
            return where, "is fixed: spatial_dims 2, in_channels from model.in_channels, out_channels 1 (one logit map)"
        if key in flat_of:
            return where, f"is set by model.{flat_of[key]}; give it there"
        if key not in valid:
            return where, f"is not an argument of MONAI {spec.monai_class}; valid: {', '.join(valid)}"
    for key in spec.required:
        if key not in args:
            choices = f": one of {', '.join(backbones())}" if key == "backbone" else ""
            return f"model.args.{key}", f"is required by {spec.monai_class}{choices}"
    if model.name == "flexible_unet" and args["backbone"] not in backbones():
        return "model.args.backbone", f"{args['backbone']!r} is not one of {', '.join(backbones())}"
    try:
        build(model)
    except Exception as exc:  # noqa: BLE001 - MONAI's own message, on one line
        text = str(exc).strip().splitlines()
        return "model.args", f"MONAI {spec.monai_class} refused them: {type(exc).__name__}: {text[0] if text else ''}"
    return None


def build(model):
    """The network of a ModelConfig, freshly initialised (no weights loaded)."""
    kwargs = network_kwargs(model.name, model.in_channels, model.channels, model.strides, model.num_res_units,
                            model.dropout, getattr(model, "args", None))
    return network_class(model.name)(**kwargs)
