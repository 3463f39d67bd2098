"""Inference on new images, exactly as training saw them: the model's settings, one image in,
one mask out at the image's own size.

Both sides need this: the operator describes it when exporting a model (fl_server.export) and a
site runs it on new scans (fl_client.predict). Images are read and normalised by the training
readers themselves (`shared.data`), so a prediction never preprocesses differently from training.
A mask comes back at the original size by resizing the logits (bilinear) and cutting at 0, the
threshold evaluation uses (`logits > 0`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from shared.config import ConfigError, ModelConfig, from_dict, to_dict
from shared.data import _LUMINANCE, _PIL_IMAGE, BadFile, _image_tensor, _read_array, _suffix

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class InferenceSpec:
    """What a trained model needs to be applied: the network and the input it was trained on."""

    model: ModelConfig
    image_size: int = 128
    channels: int = 1
    site_image_sizes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": to_dict(self.model), "image_size": self.image_size, "channels": self.channels,
                "site_image_sizes": dict(self.site_image_sizes)}

    @classmethod
    def from_dict(cls, raw: dict, origin: str) -> "InferenceSpec":
        try:
            return cls(from_dict(ModelConfig, dict(raw["model"]), origin), int(raw["image_size"]),
                       int(raw["channels"]), dict(raw.get("site_image_sizes") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: not a model description ({type(exc).__name__}: {exc})") from None


def run_config(run_dir: Path) -> tuple[dict, list[dict]]:
    """The consortium config and the resolved site configs a run dir keeps in config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.yaml: not a run directory")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not docs or not isinstance(docs[0], dict):
        raise ConfigError(f"{path}: holds no consortium config")
    return docs[0], [d for d in docs[1:] if isinstance(d, dict)]


def spec_from_run_dir(run_dir: Path) -> InferenceSpec:
    """The network (consortium `model:`) and the input size the sites trained at.

    Sites may train at different sizes (the network is fully convolutional); the most common
    one is used and every site's is kept."""
    consortium, sites = run_config(run_dir)
    origin = str(Path(run_dir) / "config.yaml")
    model = from_dict(ModelConfig, dict(consortium.get("model") or {}), origin)
    sizes = {str(s.get("name", f"site{i}")): int(s.get("image_size", 128)) for i, s in enumerate(sites)}
    values = list(sizes.values()) or [128]
    size = max(sorted(set(values)), key=values.count)
    return InferenceSpec(model, size, model.in_channels, sizes)


BEST = "best.pt"  # the run's model selection (fl_server.run_dir): the best round on calibration Dice


def default_checkpoint(run_dir: Path) -> tuple[Path, str]:
    """(checkpoint, why it was chosen): RUN_DIR/best.pt when the run selected one, else the last
    round's. The last round may be one model selection rolled back, so it is only the fallback."""
    run_dir = Path(run_dir)
    if (run_dir / BEST).is_file():
        return run_dir / BEST, "the best round on calibration Dice"
    found = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    if not found:
        raise ConfigError(f"{run_dir}: no {BEST} and no checkpoints/round_NNN.pt: the run has not completed a round")
    return found[-1], f"the last round: the run has no {BEST}"


def preprocessing_description(spec: InferenceSpec) -> dict:
    """Plain words and numbers for metadata.json: what an image goes through before the network."""
    return {
        "reading": "PNG/JPEG as rows x columns (Pillow); 2-D NIfTI (x, y) transposed to (y, x); "
                   "16-bit and float kept, palette/alpha images converted to L or RGB",
        "channels": spec.channels,
        "color": ("RGB reduced to luminance " + f"{_LUMINANCE[0]} R + {_LUMINANCE[1]} G + {_LUMINANCE[2]} B (ITU-R BT.601)"
                  if spec.channels == 1 else "gray repeated to 3 channels after normalisation"),
        "resize": {"spatial_size": [spec.image_size, spec.image_size], "mode": "bilinear",
                   "antialias": True, "align_corners": False,
                   "implementation": "torch.nn.functional.interpolate"},
        "intensity": "each image on its own: zero mean, unit standard deviation (population std); "
                     "a constant image becomes zeros",
        "output": "one logit map; resized back to the image size (bilinear, align_corners False); "
                  "foreground where logit > 0",
    }


# ----------------------------------------------------------------------------- one image


@dataclass
class Loaded:
    """One input image: the network's tensor and what is needed to write its mask back."""

    path: Path
    tensor: torch.Tensor  # (C, S, S) float32, as in training
    size: tuple[int, int]  # original (H, W)
    original: np.ndarray  # (H, W) or (H, W, C), for overlays


def is_nifti(path: Path) -> bool:
    return _suffix(Path(path)) in NIFTI_SUFFIXES


def image_stem(path: Path) -> str:
    suffix = _suffix(Path(path))
    return Path(path).name[: -len(suffix)] if suffix else Path(path).name


def is_image_file(path: Path) -> bool:
    return _suffix(Path(path)) is not None


def load_image(path: Path, size: int, channels: int) -> Loaded:
    """Read one image with the training reader; BadFile (one line) when it cannot be used."""
    path = Path(path)
    array = _read_array(path, _PIL_IMAGE)
    if array.ndim not in (2, 3):
        raise BadFile(path, f"has shape {array.shape}; expected a 2-D image")
    return Loaded(path, _image_tensor(array, path, size, channels), tuple(array.shape[:2]), array)


def mask_at(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(1, S, S) logits -> (H, W) uint8 mask in {0, 1} at the original size."""
    x = logits.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return (x[0] > 0).to(torch.uint8).numpy()
