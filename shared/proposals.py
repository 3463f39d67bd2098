"""Mask proposals: K candidate masks per image from the received model (DESIGN.md section 3, step 1).

For each image the model yields

- one mask per test-time augmentation in ``cfg.tta`` (the input is flipped / rotated, the
  logits are mapped back; eval mode, dropout off), labelled ``'tta:<name>'``;
- ``cfg.mc_samples`` MC-dropout samples (only the dropout layers in train mode; seeded),
  labelled ``'mc:<i>'``;
- one mask per threshold ``t`` in ``cfg.thresholds`` of the mean foreground probability over
  all the TTA and MC passes, labelled ``'thr:<t:.2f>'``.

A TTA or MC mask is ``sigmoid(logit) > 0.5``. ``K = len(tta) + mc_samples + len(thresholds)``,
in that order. The logits of the eval-mode identity pass are kept as ``ref_logits``: they are
the frozen DPO reference, cached here so the reference model never runs again.

Batching: images go through in batches of ``b = max(1, cfg.batch_size // passes)`` where
``passes = max(number of eval-mode views, mc_samples)``; the views of one batch are stacked into
one forward (views that change the shape, 90-degree rotations of non-square images, form a second
stack), and so are its MC samples, so one forward serves several passes and holds at most about
``cfg.batch_size`` samples. Masks are kept as uint8 on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.config import TTA_TRANSFORMS, ProposalConfig
from shared.model import autocast

__all__ = [
    "ProposalSet",
    "generate_proposals",
    "iter_proposals",
    "plain_inference",
    "proposal_labels",
    "apply_tta",
]


@dataclass
class ProposalSet:
    """K proposals for each of N images, stored compactly on the CPU.

    Attributes:
        masks: (N, K, H, W) uint8 in {0, 1}.
        mean_prob: (N, H, W) float32, mean foreground probability over every TTA and MC pass.
        ref_logits: (N, 1, H, W) float32, logits of the eval-mode identity pass of the received
            model: the frozen DPO reference.
        labels: K names, e.g. ``('tta:identity', 'tta:hflip', 'mc:0', 'thr:0.30')``.
    """

    masks: torch.Tensor
    mean_prob: torch.Tensor
    ref_logits: torch.Tensor
    labels: tuple[str, ...]

    def __post_init__(self):
        self.labels = tuple(self.labels)
        m = self.masks
        if m.dim() != 4 or m.dtype != torch.uint8:
            raise ValueError(f"masks must be a (N, K, H, W) uint8 tensor, got {tuple(m.shape)} {m.dtype}")
        n, k, h, w = m.shape
        if tuple(self.mean_prob.shape) != (n, h, w):
            raise ValueError(f"mean_prob has shape {tuple(self.mean_prob.shape)}, expected {(n, h, w)} from masks {tuple(m.shape)}")
        if tuple(self.ref_logits.shape) != (n, 1, h, w):
            raise ValueError(f"ref_logits has shape {tuple(self.ref_logits.shape)}, expected {(n, 1, h, w)} from masks {tuple(m.shape)}")
        if len(self.labels) != k:
            raise ValueError(f"{len(self.labels)} labels for K = {k} proposals (masks {tuple(m.shape)})")

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def k(self) -> int:
        """Proposals per image."""
        return self.masks.shape[1]

    def index(self, sel: int | slice | Sequence[int] | torch.Tensor) -> ProposalSet:
        """The proposals of the selected images, as fresh tensors (never views of this set).

        ``sel`` is an int (kept as a batch of one), a slice, a sequence of indices, a LongTensor
        or a BoolTensor of length N.
        """
        idx = _as_index(sel, len(self))
        return ProposalSet(
            masks=self.masks.index_select(0, idx),
            mean_prob=self.mean_prob.index_select(0, idx),
            ref_logits=self.ref_logits.index_select(0, idx),
            labels=self.labels,
        )

    @classmethod
    def concat(cls, parts: Sequence[ProposalSet]) -> ProposalSet:
        """Concatenate sets of the same K, labels and image size along the image axis."""
        if not parts:
            raise ValueError("ProposalSet.concat needs at least one ProposalSet")
        first = parts[0]
        for i, p in enumerate(parts):
            if p.labels != first.labels or p.masks.shape[2:] != first.masks.shape[2:]:
                raise ValueError(
                    f"part {i} has labels {p.labels} and masks {tuple(p.masks.shape)}, "
                    f"part 0 has {first.labels} and {tuple(first.masks.shape)}"
                )
        return cls(
            masks=torch.cat([p.masks for p in parts]),
            mean_prob=torch.cat([p.mean_prob for p in parts]),
            ref_logits=torch.cat([p.ref_logits for p in parts]),
            labels=first.labels,
        )


def proposal_labels(cfg: ProposalConfig) -> tuple[str, ...]:
    """The K labels a config yields, in proposal order."""
    return (
        tuple(f"tta:{t}" for t in cfg.tta)
        + tuple(f"mc:{i}" for i in range(cfg.mc_samples))
        + tuple(f"thr:{t:.2f}" for t in cfg.thresholds)
    )


def apply_tta(x: torch.Tensor, name: str, inverse: bool = False) -> torch.Tensor:
    """Apply the test-time transform ``name`` (or its inverse) to the last two axes of ``x``."""
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "hvflip":
        return x.flip(-2, -1)
    if name == "rot90":
        return torch.rot90(x, -1 if inverse else 1, dims=(-2, -1))
    if name == "rot270":
        return torch.rot90(x, 1 if inverse else -1, dims=(-2, -1))
    raise ValueError(f"unknown test-time transform {name!r}; valid transforms: {', '.join(TTA_TRANSFORMS)}")


def generate_proposals(
    model: torch.nn.Module,
    images: torch.Tensor,
    cfg: ProposalConfig,
    device: torch.device | str,
    seed: int = 0,
) -> ProposalSet:
    """K proposals for each image (see the module docstring for what they are).

    Args:
        model: a segmenter mapping (B, C, H, W) to (B, 1, H, W) logits, already on ``device``.
            Its train/eval flags (of every submodule) are restored on exit.
        images: (N, C, H, W), any device; moved to ``device`` batch by batch.
        cfg: TTA transforms, MC samples, thresholds and the forward batch size.
        device: where the forwards run (autocast on CUDA).
        seed: seeds the MC-dropout samples; the global RNG state is left untouched.

    Returns:
        a ProposalSet on the CPU with ``masks`` (N, K, H, W) uint8.
    """
    return _generate(model, images, cfg, torch.device(device), seed, index_offset=0)


def iter_proposals(
    model: torch.nn.Module,
    images: torch.Tensor,
    cfg: ProposalConfig,
    device: torch.device | str,
    chunk_size: int = 64,
    seed: int = 0,
) -> Iterator[tuple[int, ProposalSet]]:
    """Yield ``(start, ProposalSet of images[start:start + n])`` for consecutive chunks.

    Memory is bounded by one chunk. The chunk size is rounded down to a multiple of the image
    batch (at least one batch), so the MC-dropout seeds, which are drawn per batch from ``seed``
    and the batch's first image index, fall the same way as in one ``generate_proposals`` call:
    the chunks concatenate to exactly that call's result.
    """
    device = torch.device(device)
    _check_config(cfg)
    _check_images(images)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch = _image_batch(cfg)
    step = max(batch, (chunk_size // batch) * batch)
    for start in range(0, images.shape[0], step):
        yield start, _generate(model, images[start : start + step], cfg, device, seed, index_offset=start)


def plain_inference(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 32,
) -> torch.Tensor:
    """Eval-mode logits (N, 1, H, W) float32 on the CPU, in batches of ``batch_size`` images.

    The throughput baseline for proposals, and what evaluation scores. The model's train/eval
    flags are restored on exit.
    """
    device = torch.device(device)
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype = _model_dtype(model, device)
    out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.float32)
    with _ModeGuard(model), torch.inference_mode():
        model.eval()
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device=device, dtype=dtype)
            out[start : start + len(x)] = _forward(model, x, device).float().cpu()
    return out


# ----------------------------------------------------------------------------- internals


def _generate(model, images, cfg: ProposalConfig, device: torch.device, seed: int, index_offset: int) -> ProposalSet:
    _check_config(cfg)
    _check_images(images)
    n, _, h, w = images.shape
    labels = proposal_labels(cfg)
    n_tta, n_mc, n_thr = len(cfg.tta), cfg.mc_samples, len(cfg.thresholds)
    # the eval-mode views to forward: the TTA ones, plus identity for the reference if absent
    views = list(dict.fromkeys(cfg.tta))
    if "identity" not in views:
        views.append("identity")
    groups: dict[tuple[int, int], list[str]] = {}
    for name in views:
        shape = (w, h) if name in ("rot90", "rot270") else (h, w)
        groups.setdefault(shape, []).append(name)

    masks = torch.empty((n, n_tta + n_mc + n_thr, h, w), dtype=torch.uint8)
    mean_prob = torch.empty((n, h, w), dtype=torch.float32)
    ref_logits = torch.empty((n, 1, h, w), dtype=torch.float32)
    thresholds = torch.tensor(cfg.thresholds, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    dtype = _model_dtype(model, device)
    batch = _image_batch(cfg)
    dropout_layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]

    with _ModeGuard(model), torch.inference_mode():
        for start in range(0, n, batch):
            x = images[start : start + batch].to(device=device, dtype=dtype)
            b = x.shape[0]
            # --- eval-mode views, one stacked forward per output shape
            model.eval()
            view_logits: dict[str, torch.Tensor] = {}
            for names in groups.values():
                stacked = torch.cat([apply_tta(x, name) for name in names])
                out = _forward(model, stacked, device).float()
                for i, name in enumerate(names):
                    view_logits[name] = apply_tta(out[i * b : (i + 1) * b], name, inverse=True)
            passes = [view_logits[name] for name in cfg.tta]
            # --- MC dropout: only the dropout layers in train mode, the samples stacked
            if n_mc:
                for layer in dropout_layers:
                    layer.train()
                with _seeded(device, _batch_seed(seed, index_offset + start)):
                    out = _forward(model, x.repeat(n_mc, 1, 1, 1), device).float()
                model.eval()
                passes.extend(out[i * b : (i + 1) * b] for i in range(n_mc))
            logits = torch.cat(passes, dim=1)  # (b, n_tta + n_mc, h, w)
            prob = torch.sigmoid(logits)
            mean = prob.mean(dim=1)  # (b, h, w)
            pass_masks = prob > 0.5
            thr_masks = mean.unsqueeze(1) > thresholds
            sl = slice(start, start + b)
            masks[sl] = torch.cat([pass_masks, thr_masks], dim=1).to(torch.uint8).cpu()
            mean_prob[sl] = mean.cpu()
            ref_logits[sl] = view_logits["identity"].cpu()
    return ProposalSet(masks=masks, mean_prob=mean_prob, ref_logits=ref_logits, labels=labels)


def _forward(model, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != 1 or out.shape[2:] != x.shape[2:]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the model must map (B, C, H, W) images to (B, 1, H, W) logits; input {tuple(x.shape)} gave {got}"
        )
    return out


def _image_batch(cfg: ProposalConfig) -> int:
    """Images per batch: the stacked views and MC samples of one batch fill about cfg.batch_size."""
    views = len(set(cfg.tta) | {"identity"})
    return max(1, cfg.batch_size // max(views, cfg.mc_samples, 1))


def _batch_seed(seed: int, first_index: int) -> int:
    """A well-mixed 63-bit seed for the MC samples of the batch starting at image first_index."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(first_index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class _seeded:
    """Seed torch's generators for a block, restoring the global RNG state afterwards."""

    def __init__(self, device: torch.device, seed: int):
        cuda = device.type == "cuda"
        self._fork = torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [])
        self._seed = seed

    def __enter__(self):
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


class _ModeGuard:
    """Restore the train/eval flag of every submodule on exit."""

    def __init__(self, model: torch.nn.Module):
        self._flags = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for module, flag in self._flags:
            module.training = flag
        return False


def _model_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    if param is None:
        return torch.float32
    if param.device.type != device.type:
        raise ValueError(f"the model's parameters are on {param.device} but device is {device}: call model.to(device) first")
    return param.dtype if param.dtype.is_floating_point else torch.float32


def _check_config(cfg: ProposalConfig) -> None:
    bad = [t for t in cfg.tta if t not in TTA_TRANSFORMS]
    if bad:
        raise ValueError(f"proposals.tta: {bad[0]!r} is not one of {', '.join(TTA_TRANSFORMS)}")
    if len(set(cfg.tta)) != len(cfg.tta):
        raise ValueError(f"proposals.tta lists a transform twice: {cfg.tta}")
    if cfg.mc_samples < 0:
        raise ValueError(f"proposals.mc_samples must be >= 0, got {cfg.mc_samples}")
    if not cfg.tta and cfg.mc_samples == 0:
        raise ValueError("proposals need at least one pass: give proposals.tta or proposals.mc_samples > 0")
    for t in cfg.thresholds:
        if not 0.0 < t < 1.0:
            raise ValueError(f"proposals.thresholds: {t!r} must be between 0 and 1")
    if cfg.batch_size < 1:
        raise ValueError(f"proposals.batch_size must be >= 1, got {cfg.batch_size}")


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {got}")


def _as_index(sel, n: int) -> torch.Tensor:
    if isinstance(sel, (int, np.integer)):
        if not -n <= sel < n:
            raise IndexError(f"image index {sel} is out of range for {n} images")
        return torch.tensor([sel % n])
    if isinstance(sel, slice):
        return torch.arange(n)[sel]
    idx = torch.as_tensor(sel)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise IndexError(f"a boolean selection must have shape ({n},), got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if idx.dtype.is_floating_point or idx.dim() != 1:
        raise IndexError(f"select images with an int, slice, or 1-D integer/bool sequence, got {idx.dtype} {tuple(idx.shape)}")
    if idx.min() < -n or idx.max() >= n:
        raise IndexError(f"image indices {idx.min().item()}..{idx.max().item()} are out of range for {n} images")
    return idx.long() % n
