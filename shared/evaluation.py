"""Scoring a model on a labelled split: Dice and HD95 with MONAI's metrics."""

from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from shared.data import SplitData
from shared.proposals import plain_inference


def evaluate(model: torch.nn.Module, split: SplitData, device: torch.device, batch_size: int = 32,
             hd95: bool = True) -> dict:
    """Mean Dice and HD95 (pixels) of thresholded predictions against the split's masks
    (`hd95=False`: Dice and the image count only, for model selection, which needs no more).

    HD95 is undefined where the prediction or the truth is empty; those images are left out of
    the HD95 mean and counted in `hd95_undefined`, so an empty prediction cannot hide as NaN.
    """
    if split.masks is None:
        raise ValueError("evaluate needs a split with masks")
    if len(split.names) == 0:
        if not hd95:
            return {"dice": float("nan"), "n_images": 0}
        return {"dice": float("nan"), "hd95": float("nan"), "hd95_undefined": 0, "n_images": 0}
    logits = plain_inference(model, split.images, device, batch_size)
    pred = (logits > 0).to(torch.uint8)
    truth = split.masks.to(torch.uint8)

    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, truth)
    if not hd95:
        return {"dice": float(dice.mean()), "n_images": len(split.names)}
    both_present = pred.flatten(1).bool().any(1) & truth.flatten(1).bool().any(1)
    hd = torch.full((len(pred),), float("nan"))
    if both_present.any():
        hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
            warnings.simplefilter("ignore", FutureWarning)
            hd[both_present] = hd_metric(pred[both_present], truth[both_present]).flatten().float()
    finite = torch.isfinite(hd)
    return {
        "dice": float(dice.mean()),
        "hd95": float(hd[finite].mean()) if finite.any() else math.nan,
        "hd95_undefined": int((~finite).sum()),
        "n_images": len(split.names),
    }
