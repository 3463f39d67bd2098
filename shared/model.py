"""Segmentation model, device, precision and weight helpers (no Flower import).

Models are MONAI 2D networks with one output channel: they map (B, C, H, W) images to
(B, 1, H, W) logit maps. Weights travel as ``{name: numpy array}`` or, in the Flower apps,
as ``ArrayRecord(model.state_dict())``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from shared.networks import MODEL_NAMES

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "resolve_device",
    "autocast",
    "get_weights",
    "set_weights",
    "count_parameters",
    "seed_everything",
]

DEVICE_SPECS = ("auto", "cpu", "cuda")


def build_model(
    name: str = "unet",
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.1,
    args: Mapping | None = None,
) -> torch.nn.Module:
    """Build a 2D binary segmenter whose output is a (B, 1, H, W) logit map.

    Args:
        name: ``"unet"``: MONAI ``UNet`` (residual units, instance norm; about 0.4 M
            parameters with the defaults, H and W divisible by 8);
            ``"basic_unet"``: MONAI ``BasicUNet`` (4 downsamplings, H and W need not be
            divisible by 16). Its 6 ``features`` are ``channels`` when 6 are given, else
            ``(c0, c0, c1, c2, c3, c0)`` from 4 channels (about 0.5 M parameters with the
            defaults); ``strides`` and ``num_res_units`` do not apply to it;
            ``"segresnet"``, ``"attention_unet"`` (``channels`` and ``strides`` as UNet's),
            ``"flexible_unet"`` (``args["backbone"]`` required): see ``shared.networks``.
        in_channels: image channels (1 for grey scale, 3 for RGB).
        channels, strides, num_res_units: UNet architecture, as in MONAI.
        dropout: dropout probability (also what MC-dropout proposals sample); the network's
            own dropout argument (SegResNet's ``dropout_prob``).
        args: further constructor arguments of the MONAI class (``model.args``).
    """
    from shared.networks import network_class, network_kwargs

    kwargs = network_kwargs(name, in_channels, channels, strides, num_res_units, dropout, args)
    return network_class(name)(**kwargs)


def resolve_device(spec: str) -> torch.device:
    """Map a config value ``"auto" | "cpu" | "cuda"`` to a device.

    ``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without CUDA raises RuntimeError.
    """
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available here; use 'auto' or 'cpu'")
        return torch.device("cuda")
    raise ValueError(f"unknown device {spec!r}; valid values: {', '.join(DEVICE_SPECS)}")


def autocast(device: torch.device | str):
    """Mixed precision context: bfloat16 (float16 where bf16 is unsupported) on CUDA, no-op on CPU.

    Under float16 the caller should use a ``torch.amp.GradScaler``; compute losses in float32.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler where `autocast` runs float16 (CUDA without bf16), else None: bf16 and
    float32 gradients do not underflow the way float16 ones do."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as CPU numpy arrays (copies), dtype preserved."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: torch.nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load ``arrays`` into ``model`` after checking every key and shape.

    The model's tensors keep their dtype and device (values are copied into them).

    Raises:
        ValueError: naming the first model key missing from ``arrays``, else the first key
            the model does not have, else the first key whose shape differs (both shapes).
    """
    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    if missing:
        raise ValueError(f"weights lack key {missing[0]!r} ({len(missing)} model keys missing in all)")
    unexpected = [k for k in arrays if k not in state]
    if unexpected:
        raise ValueError(f"weights have key {unexpected[0]!r} that the model does not ({len(unexpected)} in all)")
    new_state = {}
    for key, target in state.items():
        value = torch.as_tensor(arrays[key])
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"weight {key!r} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}"
            )
        new_state[key] = value
    model.load_state_dict(new_state, strict=True)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def load_state(path) -> dict:
    """Weights from a checkpoint of ours, a plain saved state dict or a MONAI bundle folder
    (shared.checkpoints.read_state: a TorchScript-only bundle is refused in one line)."""
    from shared.checkpoints import read_state

    return read_state(path)
