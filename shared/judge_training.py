"""The consortium's quality judge at a site: one judge round, and the judge it scores with.

A site's own learned judge (`judge.kind: learned`) sees only its own 30-50 labelled frames. The
consortium's (`judge.kind: federated`, consortium `quality_judge:`) is the same mask-quality
network trained at every site on its labelled split and averaged by the server: every site's
labels teach it, and no scan moves. A judge round at a site is

1. out-of-fold proposals: k segmenters, each trained from scratch on k-1 folds of the labelled
   split, propose masks for the fold it never saw (a model that saw an image proposes a near
   perfect mask and teaches the judge nothing). They are made once and kept in the site's
   work_dir (`judge_oof.pt`, masks of the site's own images: they never leave it), remade when
   the labelled split or the settings change;
2. `steps` Adam steps of the received judge on those proposals and freshly corrupted true masks
   (`LearnedJudge.fit`, half of each);
3. the new weights and the mean loss, nothing per image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from shared.checkpoints import save_atomically
from shared.config import ProposalConfig, QualityJudgeConfig, SupervisedConfig, to_dict
from shared.data import SplitData
from shared.judges.learned import LearnedJudge, QualityNet, out_of_fold_indices
from shared.proposals import generate_proposals, proposal_labels

OOF_FILE = "judge_oof.pt"

log = logging.getLogger(__name__)


def initial_judge_state(in_channels: int, seed: int) -> dict[str, torch.Tensor]:
    """The consortium judge's starting weights (the server makes them; seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = QualityNet(in_channels + 1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def consortium_judge(state: Mapping[str, torch.Tensor], channels: int, image_size: int) -> LearnedJudge:
    """The judge a `federated` site scores with: the consortium's weights, as received."""
    judge = LearnedJudge(channels, image_size)
    judge.net.load_state_dict(state, strict=True)
    judge.name = "federated"
    return judge


def out_of_fold_proposals(labeled: SplitData, model_factory: Callable[[], torch.nn.Module],
                          fold_training: SupervisedConfig, proposals_cfg: ProposalConfig, folds: int,
                          device, seed: int = 0, progress: Callable | None = None) -> torch.Tensor:
    """``(N, K, H, W)`` uint8 proposals for the labelled images, each from a segmenter trained
    (``fold_training.steps`` steps) on the folds that do not hold the image. A site with
    `data.groups` keeps each group (patient, video) in one fold (`out_of_fold_indices`)."""
    from shared.training import subset, supervised_round  # training imports the judges

    if labeled.masks is None:
        raise ValueError("the labeled split has no masks, but the quality judge learns from them")
    n = len(labeled.names)
    oof = torch.zeros((n, len(proposal_labels(proposals_cfg)), *labeled.masks.shape[-2:]), dtype=torch.uint8)
    for fold, (train_idx, held_idx) in enumerate(out_of_fold_indices(n, folds, seed, fold_groups(labeled, warn=True))):
        fold_model = model_factory()
        supervised_round(fold_model, subset(labeled, train_idx), fold_training, device, seed=seed + fold,
                         progress=progress)
        oof[held_idx] = generate_proposals(fold_model, labeled.images[held_idx], proposals_cfg, device, seed=seed).masks
    return oof


def fold_groups(labeled: SplitData, warn: bool = False) -> list[str] | None:
    """The groups the out-of-fold folds keep whole: the split's `data.groups` keys when it holds
    two groups or more, else None (folds by image; with `warn`, said once in the site's log)."""
    groups = labeled.groups
    if groups is None or len(set(groups)) >= 2:
        return groups
    if warn and groups:
        log.warning("every labelled image comes from one group (patient, video): the out-of-fold folds are cut "
                    "by image, so a fold's segmenter has seen other images of the group it proposes for")
    return None


def cached_out_of_fold_proposals(work_dir: Path, labeled: SplitData, model_factory: Callable[[], torch.nn.Module],
                                 settings: dict, fold_training: SupervisedConfig, proposals_cfg: ProposalConfig,
                                 folds: int, device, seed: int, progress: Callable | None = None) -> torch.Tensor:
    """`out_of_fold_proposals`, made once per labelled split and settings and kept in
    ``work_dir/judge_oof.pt`` (a judge round runs in a fresh process in deployment)."""
    groups = fold_groups(labeled)
    key = hashlib.sha256(json.dumps({"names": list(labeled.names), "shape": list(labeled.images.shape),
                                     "folds": folds, "seed": seed, "training": to_dict(fold_training),
                                     "proposals": to_dict(proposals_cfg), **settings,
                                     # grouped folds (a site with data.groups); absent: the key before
                                     **({"groups": groups} if groups is not None else {})},
                                    sort_keys=True, default=str).encode()).hexdigest()
    path = Path(work_dir) / OOF_FILE
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a foreign or damaged file: it is only a cache
            log.warning("%s unreadable (%s): the out-of-fold proposals are made again", path, type(exc).__name__)
        else:
            if saved.get("key") == key:
                return saved["masks"]
    masks = out_of_fold_proposals(labeled, model_factory, fold_training, proposals_cfg, folds, device, seed, progress)
    save_atomically({"key": key, "masks": masks}, path)
    return masks


def judge_round(state: Mapping[str, torch.Tensor], labeled: SplitData, model_factory: Callable[[], torch.nn.Module],
                model_settings: dict, cfg: QualityJudgeConfig, supervised: SupervisedConfig,
                proposals_cfg: ProposalConfig, work_dir: Path, device, seed: int,
                progress: Callable | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round of the consortium judge at this site: the received weights trained ``cfg.steps``
    steps on the labelled split; returns the new weights and aggregate figures."""
    fold_training = dataclasses.replace(supervised, steps=cfg.fold_steps)
    oof = cached_out_of_fold_proposals(work_dir, labeled, model_factory, {"model": model_settings}, fold_training,
                                       proposals_cfg, cfg.folds, device, cfg.seed, progress)
    judge = consortium_judge(state, labeled.images.shape[1], labeled.images.shape[-1])
    stats = judge.fit(labeled.images, labeled.masks, oof, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                      device=device, holdout=0.0, draw_seed=seed, rank_weight=cfg.rank_weight)
    weights = {k: v.detach().cpu() for k, v in judge.net.state_dict().items()}
    return weights, {"judge_loss": stats["final_loss"], "judge_steps": float(cfg.steps)}
