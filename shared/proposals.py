"""Mask proposals: K candidate masks per image from the received model (DESIGN.md section 3, step 1).

For each image the model yields

- one mask per test-time augmentation in ``cfg.tta`` (the input is flipped / rotated, the
  logits are mapped back; eval mode, dropout off), labelled ``'tta:<name>'``;
- ``cfg.mc_samples`` MC-dropout samples (seeded), labelled ``'mc:<i>'``: each sample is one
  draw of the dropout masks, shared by the images of a batch (a forward hook on each
  ``nn.Dropout``; other dropout kinds run in train mode). Every image still gets ``mc_samples``
  independent subnetworks; drawing one mask per sample instead of one per image and sample cuts
  what MC dropout costs on a CPU, the random numbers, by the batch size (``benchmarks/engine.py``);
- one mask per threshold ``t`` in ``cfg.thresholds``, labelled ``'thr:<t:.2f>'``, of the mean
  foreground probability over all the TTA and MC passes (``threshold_of: mean``) or of the
  identity pass's own probability map (``threshold_of: identity``);
- one mask per radius ``r`` in ``cfg.morph``: the identity pass's mask dilated (``r > 0``) or
  eroded (``r < 0``) by a (2|r|+1)-pixel square, labelled ``'morph:+1'``, ``'morph:-1'``: the
  boundary variants RN-DPO's disagreement region is made of.

A TTA or MC mask is ``sigmoid(logit) > 0.5``. ``K = len(tta) + mc_samples + len(thresholds) +
len(morph)``, in that order. The logits of the eval-mode identity pass are kept as
``ref_logits``: they are the frozen DPO reference, cached here so the reference model never
runs again.

Every proposal knows the pass it was made from (``ProposalSet.sources``), and the probability
map of every pass is kept (``pass_probs``, float16), so that a label-free judge can score a
proposal against the passes that did not produce it (leave-one-out) instead of against a mean
it is itself part of. ``plausible`` flags proposals whose area is far from the consensus's (a
mask covering the frame, or nothing): mining never uses them.

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
    "proposal_sources",
    "plausible",
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
        positions: (N,) int64, each image's position in the split it came from (0..N-1 when None).
        pass_probs: (N, P, H, W) float16 probability map of each of the P passes (the first P
            proposals), or None.
        sources: K ints, the pass (proposal index < P) each proposal was made from, -1 for a
            proposal made from every pass (a threshold of the mean); None when unknown.
    """

    masks: torch.Tensor
    mean_prob: torch.Tensor
    ref_logits: torch.Tensor
    labels: tuple[str, ...]
    positions: torch.Tensor | None = None
    pass_probs: torch.Tensor | None = None
    sources: tuple[int, ...] | None = None

    def __post_init__(self):
        self.labels = tuple(self.labels)
        if self.positions is None:
            self.positions = torch.arange(self.masks.shape[0])
        if self.sources is not None:
            self.sources = tuple(int(x) for x in self.sources)
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
        if tuple(self.positions.shape) != (n,):
            raise ValueError(f"positions has shape {tuple(self.positions.shape)}, expected ({n},)")
        if self.pass_probs is not None and (self.pass_probs.dim() != 4 or tuple(self.pass_probs.shape[::2]) != (n, h)
                                            or self.pass_probs.shape[3] != w or self.pass_probs.shape[1] > k):
            raise ValueError(f"pass_probs has shape {tuple(self.pass_probs.shape)}, expected ({n}, P <= {k}, {h}, {w})")
        if self.sources is not None and len(self.sources) != k:
            raise ValueError(f"{len(self.sources)} sources for K = {k} proposals")

    @property
    def n_passes(self) -> int:
        """P: how many of the proposals are raw passes (TTA views and MC samples), 0 if unknown."""
        return 0 if self.pass_probs is None else self.pass_probs.shape[1]

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
            positions=self.positions.index_select(0, idx),
            pass_probs=None if self.pass_probs is None else self.pass_probs.index_select(0, idx),
            sources=self.sources,
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
        sources = {p.sources for p in parts}
        if len(sources - {None}) > 1:
            raise ValueError(f"the parts disagree on the proposals' sources: {sorted(sources - {None})}")
        probs = [p.pass_probs for p in parts]
        return cls(
            masks=torch.cat([p.masks for p in parts]),
            mean_prob=torch.cat([p.mean_prob for p in parts]),
            ref_logits=torch.cat([p.ref_logits for p in parts]),
            labels=first.labels,
            positions=torch.cat([p.positions for p in parts]),
            pass_probs=None if any(x is None for x in probs) else torch.cat(probs),
            sources=None if None in sources else first.sources,
        )


def proposal_labels(cfg: ProposalConfig) -> tuple[str, ...]:
    """The K labels a config yields, in proposal order."""
    return (
        tuple(f"tta:{t}" for t in cfg.tta)
        + tuple(f"mc:{i}" for i in range(cfg.mc_samples))
        + tuple(f"thr:{t:.2f}" for t in cfg.thresholds)
        + tuple(f"morph:{r:+d}" for r in cfg.morph)
    )


def proposal_sources(cfg: ProposalConfig) -> tuple[int, ...]:
    """For each proposal, the pass it was made from: its own index for a TTA or MC pass, the
    identity pass's index for identity-derived thresholds and morphological variants, -1 for
    thresholds of the mean over every pass."""
    passes = len(cfg.tta) + cfg.mc_samples
    identity = cfg.tta.index("identity") if "identity" in cfg.tta else -1
    thr_source = -1 if cfg.threshold_of == "mean" else identity
    return tuple(range(passes)) + (thr_source,) * len(cfg.thresholds) + (identity,) * len(cfg.morph)


def plausible(proposals: ProposalSet, max_area_ratio: float | None) -> torch.Tensor:
    """(N, K) bool: proposals whose foreground area is within a factor ``max_area_ratio`` of the
    consensus mask's (``mean_prob > 0.5``; its area taken as at least 1 % of the image for the
    upper bound). A mask that covers the frame or vanishes is not a candidate answer, and a pair
    against it teaches what the model already knows. All True when ``max_area_ratio`` is None.
    """
    n, k, h, w = proposals.masks.shape
    if max_area_ratio is None:
        return torch.ones((n, k), dtype=torch.bool)
    area = (proposals.masks != 0).flatten(2).sum(-1).double()  # (N, K)
    consensus = (proposals.mean_prob > 0.5).flatten(1).sum(-1, keepdim=True).double()  # (N, 1)
    upper = max_area_ratio * consensus.clamp_min(0.01 * h * w)
    return (area <= upper) & (area >= consensus / max_area_ratio)


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
    n_tta, n_mc, n_thr, n_morph = len(cfg.tta), cfg.mc_samples, len(cfg.thresholds), len(cfg.morph)
    # the eval-mode views to forward: the TTA ones, plus identity for the reference if absent
    views = list(dict.fromkeys(cfg.tta))
    if "identity" not in views:
        views.append("identity")
    groups: dict[tuple[int, int], list[str]] = {}
    for name in views:
        shape = (w, h) if name in ("rot90", "rot270") else (h, w)
        groups.setdefault(shape, []).append(name)

    masks = torch.empty((n, n_tta + n_mc + n_thr + n_morph, h, w), dtype=torch.uint8)
    pass_probs = torch.empty((n, n_tta + n_mc, h, w), dtype=torch.float16)
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
                with _seeded(device, _batch_seed(seed, index_offset + start)), _SharedDropout(dropout_layers, n_mc):
                    out = _forward(model, x.repeat(n_mc, 1, 1, 1), device).float()
                model.eval()
                passes.extend(out[i * b : (i + 1) * b] for i in range(n_mc))
            logits = torch.cat(passes, dim=1)  # (b, n_tta + n_mc, h, w)
            prob = torch.sigmoid(logits)
            mean = prob.mean(dim=1)  # (b, h, w)
            pass_masks = prob > 0.5
            identity_prob = torch.sigmoid(view_logits["identity"])  # (b, 1, h, w)
            thr_map = mean.unsqueeze(1) if cfg.threshold_of == "mean" else identity_prob
            parts = [pass_masks, thr_map > thresholds]
            if n_morph:
                parts.append(_morph_variants(identity_prob > 0.5, cfg.morph))
            sl = slice(start, start + b)
            masks[sl] = torch.cat(parts, dim=1).to(torch.uint8).cpu()
            pass_probs[sl] = prob.to(torch.float16).cpu()
            mean_prob[sl] = mean.cpu()
            ref_logits[sl] = view_logits["identity"].cpu()
    return ProposalSet(masks=masks, mean_prob=mean_prob, ref_logits=ref_logits, labels=labels,
                       positions=torch.arange(index_offset, index_offset + n), pass_probs=pass_probs,
                       sources=proposal_sources(cfg))


def _morph_variants(mask: torch.Tensor, radii) -> torch.Tensor:
    """(b, 1, h, w) bool -> (b, len(radii), h, w) bool: dilated (r > 0) or eroded (r < 0) by a
    (2|r|+1)-pixel square; r = 0 is the mask itself."""
    x = mask.float()
    out = []
    for r in radii:
        if r == 0:
            out.append(x)
            continue
        size = 2 * abs(r) + 1
        if r > 0:
            out.append(torch.nn.functional.max_pool2d(x, size, stride=1, padding=abs(r)))
        else:
            out.append(-torch.nn.functional.max_pool2d(-x, size, stride=1, padding=abs(r)))
    return torch.cat(out, dim=1) > 0.5


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


class _SharedDropout:
    """MC dropout with one mask per sample, shared by the images of the batch.

    The input is ``n_mc`` copies of a batch stacked sample-major. Each ``nn.Dropout`` stays in
    eval mode (identity) and a forward hook multiplies its output by a (n_mc, 1, ...) keep mask
    scaled by 1 / (1 - p), broadcast over the batch: the same expectation as dropout, with 1/b
    of the random numbers. Other dropout kinds (channel-wise, alpha) run in train mode as they are."""

    def __init__(self, layers, n_mc: int):
        self._n_mc = n_mc
        self._hooked = [m for m in layers if type(m) is torch.nn.Dropout]
        self._trained = [m for m in layers if type(m) is not torch.nn.Dropout]
        self._handles = []

    def _hook(self, module, inputs, output):
        if module.p == 0:
            return output
        if module.p == 1:
            return torch.zeros_like(output)
        grouped = output.reshape(self._n_mc, -1, *output.shape[1:])
        keep = torch.empty((self._n_mc, 1, *output.shape[1:]), device=output.device, dtype=output.dtype)
        keep.bernoulli_(1 - module.p).div_(1 - module.p)
        return (grouped * keep).reshape(output.shape)

    def __enter__(self):
        for layer in self._trained:
            layer.train()
        self._handles = [layer.register_forward_hook(self._hook) for layer in self._hooked]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for layer in self._trained:
            layer.eval()
        return False


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
    if (cfg.morph or (cfg.thresholds and cfg.threshold_of == "identity")) and "identity" not in cfg.tta:
        raise ValueError("proposals.morph and proposals.threshold_of: identity are made from the identity pass: "
                         "list identity in proposals.tta")
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
