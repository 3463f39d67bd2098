"""What a site does with one message: train a round or evaluate, on its own data.

This is the task layer between the Flower ClientApp (or `fl-client local`) and the engine:
it loads the site's data and judge, builds the model from the consortium's model settings,
runs the engine, and returns the new weights with aggregate numbers only. It keeps no state in
memory between calls: the learned judge and anything else that lasts lives in the site's
work_dir, because in deployment every message runs in a fresh process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from shared.config import (AggregationConfig, MiningConfig, ModelConfig, PreferenceConfig, QualityJudgeConfig, SiteConfig,
                           SupervisedConfig, to_dict)
from shared.data import SplitData, load_site_data
from shared.evaluation import evaluate
from shared.judge_training import consortium_judge, judge_round
from shared.judges import build_judge
from shared.model import build_model, resolve_device, seed_everything
from shared.training import RoundResult, prepare_learned_judge, preference_round, supervised_round

log = logging.getLogger(__name__)


def model_from_config(model_cfg: ModelConfig) -> torch.nn.Module:
    return build_model(
        model_cfg.name,
        in_channels=model_cfg.in_channels,
        channels=model_cfg.channels,
        strides=model_cfg.strides,
        num_res_units=model_cfg.num_res_units,
        dropout=model_cfg.dropout,
        args=model_cfg.args,
    )


def load_model(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor] | None = None):
    model = model_from_config(model_cfg)
    if state is not None:
        model.load_state_dict(state)
    return model


def site_judge(site: SiteConfig, splits: dict[str, SplitData], model_cfg: ModelConfig,
               supervised: SupervisedConfig, preference: PreferenceConfig, device, seed: int = 0,
               progress=None, judge_state: Mapping[str, torch.Tensor] | None = None):
    """The site's judge; the learned one is trained on first use and kept in work_dir, the
    federated one is the consortium's `judge_state` as the server sent it this round."""
    if site.judge.kind == "federated":
        if judge_state is None:
            raise ValueError(f"{site.source_file}: judge.kind: 'federated' scores with the consortium's quality "
                             "judge, but the server sent none (the consortium YAML has no quality_judge: section)")
        return consortium_judge(judge_state, site.channels, site.image_size).to(device)
    if site.judge.kind == "learned":
        return prepare_learned_judge(
            site.judge, site.work_dir, splits["labeled"],
            lambda: model_from_config(model_cfg),
            supervised, preference.proposals, device, progress, seed=site.judge.seed,
        )
    # a fresh judge every round (fresh process in deployment): vary its noise seed by round
    return build_judge(dataclasses.replace(site.judge, seed=site.judge.seed + seed), site.work_dir, site=site.name)


def train_round(
    site: SiteConfig,
    model_cfg: ModelConfig,
    phase: str,
    state: Mapping[str, torch.Tensor],
    supervised: SupervisedConfig,
    preference: PreferenceConfig,
    seed: int,
    splits: dict[str, SplitData] | None = None,
    progress: Callable | None = None,
    reference_state: Mapping[str, torch.Tensor] | None = None,
    calibration_mining: MiningConfig | None = None,
    informative_gap: float = AggregationConfig.informative_gap,
    judge_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], RoundResult]:
    """One local round from the received global weights; returns new weights and numbers.

    `reference_state`: the fixed DPO reference the server sends under `preference.reference: base`
    (None: the received weights are the reference). `calibration_mining`, `informative_gap`: how
    the judge is measured on calibration (shared.training.preference_round); `judge_state`: the
    consortium's quality judge, for a site whose judge.kind is federated. A preference round
    also reports its outcome on calibration (`outcome_figures`): the server's ledger judges the
    judge by what its update did, not only by how it ranks masks."""
    if phase not in ("supervised", "preference"):
        raise ValueError(f"unknown phase {phase!r}: expected supervised or preference")
    _check_channels(site, model_cfg)
    seed_everything(seed)
    device = resolve_device(site.device)
    splits = splits or load_site_data(site)
    model = load_model(model_cfg, state).to(device)
    if phase == "supervised":
        result = supervised_round(model, splits["labeled"], supervised, device, seed, progress)
    else:
        judge = site_judge(site, splits, model_cfg, supervised, preference, device, seed, progress, judge_state)
        calibration = splits["calibration"]
        before = evaluate(model, calibration, device, hd95=False) if calibration.masks is not None else None
        result = preference_round(
            model, splits["unlabeled"], calibration, splits["labeled"],
            judge, preference, device, seed, progress,
            reference=load_model(model_cfg, reference_state) if reference_state is not None else None,
            calibration_mining=calibration_mining, informative_gap=informative_gap,
        )
        if before is not None:
            result.metrics.update(outcome_figures(before, evaluate(model, calibration, device, hd95=False)))
    result.metrics["skipped_files"] = float(sum(len(s.skipped) for s in splits.values()))
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return weights, result


def train_judge_round(site: SiteConfig, model_cfg: ModelConfig, supervised: SupervisedConfig,
                      preference: PreferenceConfig, quality: QualityJudgeConfig, judge_state: Mapping[str, torch.Tensor],
                      seed: int, splits: dict[str, SplitData] | None = None, progress: Callable | None = None,
                      ) -> tuple[dict[str, torch.Tensor], RoundResult]:
    """One round of the consortium's quality judge on this site's labelled split
    (shared.judge_training): the new judge weights, and the labelled image count they are
    weighed by."""
    _check_channels(site, model_cfg)
    seed_everything(seed)
    splits = splits or load_site_data(site, splits=("labeled",))
    weights, metrics = judge_round(judge_state, splits["labeled"], lambda: model_from_config(model_cfg),
                                   to_dict(model_cfg), quality, supervised, preference.proposals, site.work_dir,
                                   resolve_device(site.device), seed, progress)
    return weights, RoundResult(num_examples=len(splits["labeled"].names), metrics=metrics)


def outcome_figures(before: dict, after: dict) -> dict:
    """The outcome check: calibration Dice of the received model and of the site's update (the
    `evaluate(..., hd95=False)` dicts of each), their difference, and the image count; no images:
    empty (no evidence)."""
    if not before.get("n_images"):
        return {}
    return {"outcome_dice_before": before["dice"], "outcome_dice_after": after["dice"],
            "outcome_gain": after["dice"] - before["dice"], "outcome_images": before["n_images"]}


def evaluate_round(site: SiteConfig, model_cfg: ModelConfig, state: Mapping[str, torch.Tensor],
                   splits: dict[str, SplitData] | None = None) -> dict:
    """Dice and HD95 of the received model on the site's held-out test split and, when `splits`
    has a labelled calibration split, its Dice there (`calib_dice`, `calib_images`): the server
    selects the best round on calibration, never on test (shared.selection)."""
    _check_channels(site, model_cfg)
    device = resolve_device(site.device)
    splits = splits or load_site_data(site, splits=("test", "calibration"))
    model = load_model(model_cfg, state).to(device)
    scores = evaluate(model, splits["test"], device)
    calibration = splits.get("calibration")
    if calibration is not None and calibration.masks is not None:
        calib = evaluate(model, calibration, device, hd95=False)
        scores.update(calib_dice=calib["dice"], calib_images=calib["n_images"])
    return scores


def _check_channels(site: SiteConfig, model_cfg: ModelConfig) -> None:
    if site.channels != model_cfg.in_channels:
        raise ValueError(
            f"{site.source_file}: channels: the site reads {site.channels}-channel images but the "
            f"consortium's model takes {model_cfg.in_channels} (model.in_channels)"
        )


def save_overlays(pairs, images: torch.Tensor | None, out_dir: Path, site_name: str, round_number: int,
                  limit: int = 3) -> list[Path]:
    """Chosen (green) vs rejected (red) mask outlines on calibration images, as PNGs.

    Made at the site. Only a simulation writes them into the shared run directory; a deployed
    site never sends them anywhere.
    """
    if pairs is None or len(pairs) == 0 or images is None:
        return []
    from PIL import Image
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(limit, len(pairs))):
        image = images[int(pairs.image_index[i]), 0].numpy()
        lo, hi = np.percentile(image, [1, 99])
        gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.stack([gray] * 3, -1)
        chosen = pairs.chosen[i, 0].numpy().astype(bool)
        rejected = pairs.rejected[i, 0].numpy().astype(bool)
        rgb[_outline(chosen)] = (0.1, 0.9, 0.2)
        rgb[_outline(rejected)] = (0.95, 0.15, 0.1)
        path = out_dir / f"{site_name}_round{round_number:03d}_{i}.png"
        Image.fromarray((rgb * 255).astype("uint8")).resize((256, 256), Image.NEAREST).save(path)
        written.append(path)
    return written


def _outline(mask):
    import numpy as np
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, np.ones((3, 3), bool))
