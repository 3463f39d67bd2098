"""The learned judge: a small network that predicts a mask's Dice from the image and the mask.

DESIGN.md section 3, step 2. A site trains it on its labelled split, where the true Dice of any
mask is known. The training examples per image are

- perturbed ground truth (``shared.perturb.perturb_masks``, drawn afresh every step), and
- *out-of-fold* proposals: masks from segmenters trained on the other folds of the labelled
  split (``out_of_fold_indices``), i.e. models that never saw the image. Proposals of a model
  that saw the image are near perfect and teach the judge nothing (DESIGN.md section 2).

The network sees ``C`` image channels (each standardised per image) and the mask as one more
channel, and regresses the Dice (mean squared error) through a sigmoid; with ``rank_weight`` it
also learns to order the masks of one image (a pairwise logistic term). ``fit`` holds 20% of
the images out and reports how well the judge ranks their masks, so that a site can see
whether its judge learned anything before it trusts it. The trained judge lives in the site's
work dir as ``learned_judge.pt``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from scipy.stats import spearmanr
from torch import nn

from shared.checkpoints import save_atomically
from shared.perturb import mask_dice, perturb_masks

__all__ = ["QualityNet", "LearnedJudge", "out_of_fold_indices", "rank_loss", "JUDGE_FILE"]

JUDGE_FILE = "learned_judge.pt"
RANK_GROUP = 4  # masks of one image per group of the ranking term (`fit(rank_weight=...)`)
RANK_MARGIN = 0.01  # true-Dice differences below this are ties for the ranking term
_FORMAT_VERSION = 1


class QualityNet(nn.Module):
    """Image + mask in, predicted Dice out: ``(B, C + 1, H, W)`` -> ``(B,)`` in [0, 1].

    Four stages of two MONAI ``Convolution`` blocks (3x3, batch norm, PReLU; the first of each
    stage has stride 2), global average and max pooling, and a two-layer head with a sigmoid.
    About 120 k parameters with the defaults and 2 input channels; H and W must be multiples
    of 16 (four halvings).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (16, 32, 48, 64), hidden: int = 32):
        super().__init__()
        if in_channels < 2:
            raise ValueError(f"QualityNet needs at least 2 input channels (image + mask), got {in_channels}")
        blocks = []
        c_in = in_channels
        for c in channels:
            for stride in (2, 1):
                blocks.append(
                    Convolution(spatial_dims=2, in_channels=c_in, out_channels=c, strides=stride,
                                kernel_size=3, act="PRELU", norm="BATCH")
                )
                c_in = c
        self.in_channels = in_channels
        self.divisor = 2 ** len(channels)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Linear(2 * c_in, hidden), nn.PReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The score before the sigmoid, ``(B,)``: the ranking term compares these."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QualityNet expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f"QualityNet needs H and W divisible by {self.divisor}, got {tuple(x.shape[-2:])}")
        f = self.features(x)
        pooled = torch.cat((f.mean(dim=(2, 3)), f.amax(dim=(2, 3))), dim=1)
        return self.head(pooled).squeeze(1)


class LearnedJudge:
    """Judge whose score is the predicted Dice of each proposal (higher is better).

    Args:
        in_channels: image channels ``C`` (1 grey scale, 3 RGB).
        image_size: side of the square images it is trained and applied at (multiple of 16).
        seed: seeds the network's initialisation, the training draws and the held-out split.
    """

    name = "learned"

    def __init__(self, in_channels: int, image_size: int, seed: int = 0):
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if image_size < 16 or image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the network halves it 4 times), got {image_size}")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.seed)
            self.net = QualityNet(self.in_channels + 1)
        self.net.eval()
        self.stats: dict = {}

    # ------------------------------------------------------------------------- training

    def fit(
        self,
        images: torch.Tensor,
        truth: torch.Tensor,
        oof_masks: torch.Tensor | None,
        steps: int,
        lr: float = 1e-3,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        holdout: float = 0.2,
        oof_fraction: float = 0.5,
        draw_seed: int | None = None,
        rank_weight: float = 0.0,
    ) -> dict:
        """Train on the labelled split; return training statistics (also kept in ``self.stats``).

        Args:
            images: ``(N, C, H, W)`` float images, ``H = W = image_size``.
            truth: ``(N, 1, H, W)`` ground-truth masks (nonzero is foreground).
            oof_masks: ``(N, K, H, W)`` out-of-fold proposals for the same images, or None
                (then the judge learns from perturbed ground truth only).
            steps: Adam steps of ``batch_size`` (image, mask) examples each.
            holdout: share of the *images* held out of training to measure the judge (their
                masks never train it); 0 trains on all and reports no held-out figures.
            oof_fraction: share of training examples drawn from ``oof_masks`` (when given);
                the rest are freshly perturbed ground truth.
            draw_seed: seeds the training draws (default: the judge's seed); the held-out
                images stay those of the judge's seed. A judge trained again round after
                round (the consortium's) draws new examples each time.

        Returns:
            ``steps``, ``train_images``, ``holdout_images``, ``oof_per_image`` (K),
            ``final_loss`` (mean MSE of the last 10% of steps), and on the held-out images'
            masks (8 perturbations each plus their out-of-fold proposals, if any):
            ``holdout_spearman`` (pooled rank correlation of predicted and true Dice),
            ``holdout_spearman_within`` (the same within each image, averaged),
            ``holdout_mae`` and ``holdout_pair_accuracy`` (the judge's best vs worst mask of
            each image: how often the best truly has the higher Dice); the last two again on
            the out-of-fold proposals alone (``holdout_oof_spearman_within``,
            ``holdout_oof_pair_accuracy``: the harder, more telling figures; None without
            proposals). All are None when nothing is held out.
        """
        images, truth, oof_masks = self._check_training_inputs(images, truth, oof_masks)  # on the CPU
        if steps < 1 or batch_size < 1 or lr <= 0:
            raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
        if not 0.0 <= holdout < 1.0 or not 0.0 <= oof_fraction <= 1.0:
            raise ValueError(f"holdout must be in [0, 1) and oof_fraction in [0, 1], got {holdout}, {oof_fraction}")
        if rank_weight < 0:
            raise ValueError(f"rank_weight must be >= 0, got {rank_weight}")
        device = torch.device(device)
        started = time.perf_counter()
        n = images.shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=generator)
        n_hold = min(max(int(round(holdout * n)), 1), n - 1) if holdout > 0 and n >= 2 else 0
        held, train = order[:n_hold].sort().values, order[n_hold:].sort().values
        if draw_seed is not None:
            generator = torch.Generator().manual_seed(int(draw_seed))
        # index once: no view of the full arrays is kept alive by the training tensors
        train_images, train_truth = images[train].clone(), truth[train].clone()
        train_oof = oof_masks[train].clone() if oof_masks is not None else None
        k = oof_masks.shape[1] if oof_masks is not None else 0
        p_oof = oof_fraction if k > 0 else 0.0

        self.net.to(device).train()
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        losses = []
        group = RANK_GROUP if rank_weight > 0 else 1
        for _ in range(steps):
            if group > 1:  # `group` masks of each drawn image, side by side
                idx = torch.randint(len(train), (max(1, batch_size // group),), generator=generator)
                idx = idx.repeat_interleave(group)
            else:
                idx = torch.randint(len(train), (batch_size,), generator=generator)
            masks = perturb_masks(train_truth[idx], 1, generator)[:, 0]
            if p_oof > 0:
                from_oof = torch.rand(len(idx), generator=generator) < p_oof
                pick = torch.randint(k, (len(idx),), generator=generator)
                masks = torch.where(from_oof[:, None, None], train_oof[idx, pick], masks)
            target = mask_dice(masks, train_truth[idx, 0])
            x = _augment(self._inputs(train_images[idx], masks, device), generator)
            logits = self.net.logits(x).float()
            target = target.to(device)
            loss = F.mse_loss(torch.sigmoid(logits), target)
            if group > 1:
                loss = loss + rank_weight * rank_loss(logits.view(-1, group), target.view(-1, group))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        self.net.eval()

        stats = {
            "steps": int(steps),
            "train_images": int(len(train)),
            "holdout_images": int(n_hold),
            "oof_per_image": int(k),
            "final_loss": float(np.mean(losses[-max(1, steps // 10):])),
        }
        stats.update(self._holdout_figures(images[held], truth[held], oof_masks[held] if k else None))
        stats["seconds"] = round(time.perf_counter() - started, 2)
        self.stats = stats
        return dict(stats)

    def _holdout_figures(self, images: torch.Tensor, truth: torch.Tensor, oof: torch.Tensor | None) -> dict:
        keys = ("holdout_spearman", "holdout_spearman_within", "holdout_mae", "holdout_pair_accuracy",
                "holdout_oof_spearman_within", "holdout_oof_pair_accuracy")
        if images.shape[0] == 0:
            return dict.fromkeys(keys)
        masks = perturb_masks(truth, 8, torch.Generator().manual_seed(self.seed + 1))
        if oof is not None:
            masks = torch.cat((masks, oof), dim=1)
        predicted = self._predict(images, masks).numpy()
        true = mask_dice(masks, truth).numpy()
        k = 0 if oof is None else oof.shape[1]
        oof_pred, oof_true = predicted[:, predicted.shape[1] - k:], true[:, true.shape[1] - k:]
        return {
            "holdout_spearman": _spearman(predicted.ravel(), true.ravel()),
            "holdout_spearman_within": _mean_or_none([_spearman(p, t) for p, t in zip(predicted, true)]),
            "holdout_mae": float(np.abs(predicted - true).mean()),
            "holdout_pair_accuracy": pair_accuracy(predicted, true),
            # on the model proposals alone: what the judge will rank at this site
            "holdout_oof_spearman_within": _mean_or_none([_spearman(p, t) for p, t in zip(oof_pred, oof_true)]) if k else None,
            "holdout_oof_pair_accuracy": pair_accuracy(oof_pred, oof_true) if k else None,
        }

    # ------------------------------------------------------------------------- scoring

    def score(self, images: torch.Tensor, proposals) -> torch.Tensor:
        """Predicted Dice of every proposal: ``(N, C, H, W)`` images, ``proposals.masks``
        ``(N, K, H, W)`` -> ``(N, K)`` float32 in [0, 1] on the CPU."""
        masks = torch.as_tensor(proposals.masks)
        images = torch.as_tensor(images)
        self._check_images(images, "images")
        if masks.dim() != 4 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"proposals.masks must be (N, K, H, W) = ({images.shape[0]}, K, {images.shape[-2]}, "
                f"{images.shape[-1]}) for images of shape {tuple(images.shape)}, got {tuple(masks.shape)}"
            )
        return self._predict(images, masks)

    def _predict(self, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        n, k, h, w = masks.shape
        flat = masks.reshape(n * k, h, w)
        device = next(self.net.parameters()).device
        out = torch.empty(n * k, dtype=torch.float32)
        was_training = self.net.training
        self.net.eval()
        with torch.inference_mode():
            for start in range(0, n * k, batch_size):
                idx = torch.arange(start, min(start + batch_size, n * k))
                x = self._inputs(images[idx // k], flat[idx], device)
                out[idx] = self.net(x).float().cpu()
        self.net.train(was_training)
        return out.reshape(n, k)

    def to(self, device: torch.device | str) -> "LearnedJudge":
        """Move the network (scoring runs where the network is)."""
        self.net.to(device)
        return self

    # ------------------------------------------------------------------------- persistence

    def save(self, work_dir: str | os.PathLike) -> Path:
        """Write ``work_dir/learned_judge.pt`` atomically (temporary file, then rename)."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / JUDGE_FILE
        payload = {
            "format_version": _FORMAT_VERSION,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "seed": self.seed,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "stats": dict(self.stats),
        }
        return save_atomically(payload, path)

    @classmethod
    def load(
        cls, work_dir: str | os.PathLike, in_channels: int | None = None, image_size: int | None = None
    ) -> "LearnedJudge":
        """Read ``work_dir/learned_judge.pt``; the network is on the CPU (see ``to``).

        Raises:
            FileNotFoundError: no judge has been trained at this site yet.
            ValueError: the file is not a learned judge, or was trained for another channel
                count / image size than the ``in_channels`` / ``image_size`` given.
        """
        path = Path(work_dir) / JUDGE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the learned judge has not been trained at this site yet; fl-client trains it "
                f"on the site's labelled split (out-of-fold proposals) first, then keeps it in the work dir"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            raise ValueError(f"{path}: cannot read the learned judge ({exc}); delete it to retrain") from None
        keys = ("format_version", "in_channels", "image_size", "seed", "state_dict", "stats")
        if not isinstance(payload, dict) or any(key not in payload for key in keys):
            raise ValueError(f"{path}: not a learned judge file (expected keys {', '.join(keys)}); delete it to retrain")
        if payload["format_version"] != _FORMAT_VERSION:
            raise ValueError(
                f"{path}: learned judge file format {payload['format_version']}, this code reads "
                f"{_FORMAT_VERSION}; delete it to retrain"
            )
        for key, expected in (("in_channels", in_channels), ("image_size", image_size)):
            if expected is not None and payload[key] != expected:
                raise ValueError(
                    f"{path}: the learned judge was trained for {key} = {payload[key]} but this site "
                    f"uses {key} = {expected}; delete the file to retrain the judge"
                )
        judge = cls(payload["in_channels"], payload["image_size"], seed=payload["seed"])
        judge.net.load_state_dict(payload["state_dict"], strict=True)
        judge.stats = dict(payload["stats"])
        return judge

    # ------------------------------------------------------------------------- helpers

    def _inputs(self, images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, C, H, W) images and (B, H, W) masks -> (B, C + 1, H, W) float32 input on ``device``."""
        x = images.to(device).float()
        masks = masks.to(device)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return torch.cat(((x - mean) / std, (masks != 0).float()[:, None]), dim=1)

    def _check_images(self, images: torch.Tensor, name: str) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{name} must be (N, {expected[0]}, {expected[1]}, {expected[2]}) for this learned judge "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), got {tuple(images.shape)}"
            )

    def _check_training_inputs(self, images, truth, oof_masks):
        images = torch.as_tensor(images)
        truth = torch.as_tensor(truth)
        self._check_images(images, "images")
        n, _, h, w = images.shape
        if n < 1:
            raise ValueError("fit needs at least one labelled image")
        if tuple(truth.shape) != (n, 1, h, w):
            raise ValueError(f"truth must be (N, 1, H, W) = {(n, 1, h, w)}, got {tuple(truth.shape)}")
        if oof_masks is not None:
            oof_masks = torch.as_tensor(oof_masks)
            if oof_masks.dim() != 4 or oof_masks.shape[0] != n or tuple(oof_masks.shape[-2:]) != (h, w):
                raise ValueError(f"oof_masks must be (N, K, H, W) = ({n}, K, {h}, {w}), got {tuple(oof_masks.shape)}")
            if oof_masks.shape[1] == 0:
                oof_masks = None
        truth = (truth != 0).to(device="cpu", dtype=torch.uint8)
        oof_masks = None if oof_masks is None else (oof_masks != 0).to(device="cpu", dtype=torch.uint8)
        return images.cpu(), truth, oof_masks


def out_of_fold_indices(n: int, folds: int, seed: int = 0,
                        groups: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """Deterministic k-fold split of ``range(n)``: ``folds`` pairs ``(train_idx, held_idx)``.

    Every index is held out exactly once; indices within a fold are sorted. A model trained on
    ``train_idx`` proposes masks for ``held_idx`` only. Without ``groups`` fold sizes differ by at
    most one. With ``groups`` (each image's patient or video) a group is never split: frames of
    one video are near duplicates, and a segmenter that saw one proposes near-perfect masks for
    the others. Whole groups, largest first (ties in seeded order), go to the fold with the fewest
    images; there are then min(folds, number of groups) folds, and at least 2 groups are needed.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if groups is not None:
        return _grouped_folds(n, folds, seed, groups)
    if n < folds:
        raise ValueError(f"{n} labelled images cannot be split into {folds} folds: need at least one per fold")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    splits = []
    for held in np.array_split(np.array(order, dtype=np.int64), folds):
        held_set = set(held.tolist())
        splits.append(([i for i in range(n) if i not in held_set], sorted(held_set)))
    return splits


def _grouped_folds(n: int, folds: int, seed: int, groups: list[str]) -> list[tuple[list[int], list[int]]]:
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} images")
    members: dict[str, list[int]] = {}
    for index, key in enumerate(groups):
        members.setdefault(key, []).append(index)
    if len(members) < 2:
        raise ValueError(f"the {n} labelled images come from {len(members)} group: out-of-fold folds need at least 2 groups")
    keys = sorted(members)
    shuffled = [keys[i] for i in torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()]
    held: list[list[int]] = [[] for _ in range(min(folds, len(members)))]
    for key in sorted(shuffled, key=lambda k: -len(members[k])):  # stable: ties keep the seeded order
        min(held, key=len).extend(members[key])
    return [([i for i in range(n) if i not in kept], sorted(kept)) for kept in map(set, held)]


def pair_accuracy(scores: np.ndarray, true_dice: np.ndarray) -> float | None:
    """Over images (rows), how often the highest-scored mask truly beats the lowest-scored one.

    Images whose two masks have equal true Dice, or all-equal scores, carry no pair and are
    skipped; None when no image has a pair.
    """
    scores, true_dice = np.asarray(scores), np.asarray(true_dice)
    best, worst = scores.argmax(axis=1), scores.argmin(axis=1)
    rows = np.arange(scores.shape[0])
    gap = true_dice[rows, best] - true_dice[rows, worst]
    valid = (best != worst) & (gap != 0)
    return float((gap[valid] > 0).mean()) if valid.any() else None


def rank_loss(scores: torch.Tensor, truth: torch.Tensor, margin: float = RANK_MARGIN) -> torch.Tensor:
    """Pairwise logistic (RankNet) loss within each row: ``(G, M)`` scores and true Dice of M
    masks of one image per row. Every ordered pair whose true Dice differs by more than
    ``margin`` adds ``softplus(-(s_better - s_worse))``; the mean over those pairs (0 if none).
    Pairs closer than ``margin`` carry no order worth learning."""
    better = (truth[:, :, None] - truth[:, None, :]) > margin  # [g, i, j]: mask i truly beats mask j
    if not bool(better.any()):
        return scores.sum() * 0.0
    diff = scores[:, :, None] - scores[:, None, :]
    return F.softplus(-diff[better]).mean()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and transposition of each (image, mask) example (Dice is unchanged)."""
    flips = (torch.rand(3, x.shape[0], generator=generator) < 0.5).to(x.device)
    x = torch.where(flips[0, :, None, None, None], x.flip(-1), x)
    x = torch.where(flips[1, :, None, None, None], x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(flips[2, :, None, None, None], x.transpose(-1, -2), x)
    return x


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    value = spearmanr(a, b).statistic
    return None if math.isnan(value) else float(value)


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
