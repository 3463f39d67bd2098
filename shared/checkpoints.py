"""Weights a consortium can start from: our checkpoint, a plain state dict or a MONAI bundle.

Why one place: `base_checkpoint` (checked when a run starts, before any round) and
`fl-client local --checkpoint` accept the same files and fail the same way, in one line naming
the file, the first key that does not fit (with both shapes) and the configured network, instead
of load_state_dict's screenful in round 1. Backbone weights (`model.pretrained_weights`) are read
here too: from disk only, never downloaded.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch

# the bundle layout is fl-server export's (shared.bundle imports nothing of this module: no cycle)
from shared.bundle import METADATA as BUNDLE_METADATA
from shared.bundle import TORCHSCRIPT as BUNDLE_TORCHSCRIPT
from shared.bundle import WEIGHTS as BUNDLE_WEIGHTS
from shared.config import ConfigError, ConsortiumConfig, ModelConfig
from shared.networks import describe

HEADS = ("fc.", "_fc.")  # a backbone file's classifier: not part of FlexibleUNet's encoder
# MONAI nests EfficientNet blocks by stage (`_blocks.<stage>.<block>.`); efficientnet-pytorch files
# number them flat (`_blocks.<block>.`): the mapping MONAI's own pretrained loader uses
_FLAT_BLOCKS = re.compile(r"(.+)\.\d+(\.\d+\..+)")


def read_state(path, where: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a file of ours ({"state_dict": ...}), a plain saved state dict (also
    {"model": ...} as MONAI's CheckpointSaver writes it, or with DataParallel's `module.`), or a
    MONAI bundle folder's models/model.pt. `where` (e.g. `c.yaml: base_checkpoint`) opens errors."""
    path = Path(path)
    lead = f"{where}: " if where else ""
    if path.is_dir():
        path = _bundle_weights(path, lead)
    if not path.is_file():
        raise ConfigError(f"{lead}{path}: no such file or bundle folder")
    if path.suffix == ".ts" or _is_torchscript(path):
        raise ConfigError(f"{lead}{path}: TorchScript, which holds no state dict to train from; give the "
                          "weights saved with torch.save(net.state_dict()) (a bundle's models/model.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{lead}{path}: cannot be read as PyTorch weights ({first})") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not payload or not all(torch.is_tensor(v) for v in payload.values()):
        raise ConfigError(f"{lead}{path}: holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return payload


def _bundle_weights(folder: Path, lead: str) -> Path:
    if not (folder / BUNDLE_METADATA).is_file():
        raise ConfigError(f"{lead}{folder}: a folder but not a MONAI bundle (no {BUNDLE_METADATA}); "
                          f"give a bundle folder or a weights file")
    if (folder / BUNDLE_WEIGHTS).is_file():
        return folder / BUNDLE_WEIGHTS
    if (folder / BUNDLE_TORCHSCRIPT).is_file():
        raise ConfigError(f"{lead}{folder}: the bundle has only {BUNDLE_TORCHSCRIPT}, TorchScript, which holds no "
                          f"state dict to train from; add {BUNDLE_WEIGHTS} (torch.save(net.state_dict()))")
    raise ConfigError(f"{lead}{folder}: the bundle has no {BUNDLE_WEIGHTS}")


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives carry code/ and constants.pkl; torch.save ones do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def mismatch(state: dict, target: dict) -> str | None:
    """The first way `state` does not fit `target` (a network's state dict), in words; None if it fits."""
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    if missing:
        also = f"; the file's first key the network lacks is {extra[0]!r} {_shape(state[extra[0]])}" if extra else ""
        return (f"the file lacks {missing[0]!r} (shape {_shape(target[missing[0]])} in the network; "
                f"{len(missing)} of its {len(target)} keys missing){also}")
    if extra:
        return f"the file has {extra[0]!r} {_shape(state[extra[0]])} that the network lacks ({len(extra)} such keys)"
    for key, value in target.items():
        if tuple(state[key].shape) != tuple(value.shape):
            return f"{key!r} is {_shape(state[key])} in the file but {_shape(value)} in the network"
    return None


def _shape(tensor) -> str:
    return str(tuple(tensor.shape))


def matching_state(path, model: torch.nn.Module, model_cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """The weights in `path`, checked key by key and shape by shape against `model` (built from
    `model_cfg`); ConfigError `where: path does not fit the configured network ...: why`."""
    state = read_state(path, where)
    problem = mismatch(state, model.state_dict())
    if problem:
        raise ConfigError(f"{where}: {path} does not fit the configured network {describe(model_cfg)}: {problem}")
    return state


def fresh_model(model_cfg: ModelConfig, where: str = "model.pretrained_weights") -> torch.nn.Module:
    """The configured network, its backbone from `model_cfg.pretrained_weights` when given."""
    from shared.site import model_from_config

    model = model_from_config(model_cfg)
    if model_cfg.pretrained_weights is not None:
        load_backbone(model, model_cfg.pretrained_weights, where)
    return model


def initial_model(cfg: ConsortiumConfig) -> torch.nn.Module:
    """Round 0's global model: the network, backbone weights from disk, then `base_checkpoint`
    (the whole network). Every file is checked against the network before any round runs."""
    source = cfg.source_file or "<consortium>"
    model = fresh_model(cfg.model, f"{source}: model.pretrained_weights")
    if cfg.base_checkpoint is not None:
        state = matching_state(cfg.base_checkpoint, model, cfg.model, f"{source}: base_checkpoint")
        model.load_state_dict(state, strict=True)
    return model


def load_backbone(model: torch.nn.Module, path, where: str) -> None:
    """Backbone weights from disk into FlexibleUNet's encoder (what pretrained=True would download).

    Takes the file as torchvision (ResNet) or efficientnet-pytorch (EfficientNet) saves it, or a
    whole FlexibleUNet's `encoder.*` keys; the classifier head is ignored. A 3-channel first
    convolution is summed to 1 channel for grey-scale input (the usual ImageNet-to-grey adaptation)."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ConfigError(f"{where}: {type(model).__name__} has no backbone (encoder) to load weights into")
    state = read_state(path, where)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    target = encoder.state_dict()
    kept, used = {}, set()
    for key, want in target.items():
        source = key if key in state else _FLAT_BLOCKS.sub(r"\1\2", key)
        if key.startswith(HEADS) or source not in state:
            continue
        value = state[source]
        if value.ndim == 4 and value.shape[1] == 3 and want.shape[1] == 1 and value.shape[0] == want.shape[0]:
            value = value.sum(1, keepdim=True)
        if tuple(value.shape) != tuple(want.shape):
            raise ConfigError(f"{where}: {path}: {source!r} is {_shape(value)} in the file but {_shape(want)} in the "
                              f"{type(encoder).__name__} backbone")
        kept[key] = value
        used.add(source)
    missing = [k for k in target if k not in kept and not k.startswith(HEADS) and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"{where}: {path}: lacks the backbone's {missing[0]!r} ({len(missing)} keys missing): "
                          f"not weights of this backbone")
    extra = [k for k in state if k not in used and not k.startswith(HEADS) and not k.endswith("num_batches_tracked")]
    if extra:
        raise ConfigError(f"{where}: {path}: {extra[0]!r} {_shape(state[extra[0]])} is not in the "
                          f"{type(encoder).__name__} backbone ({len(extra)} such keys)")
    encoder.load_state_dict(kept, strict=False)


def save_atomically(payload, path: Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader (a resumed run, the
    next round's fresh process) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
