"""One round of local training at a site: supervised warm-up or a preference round.

`preference_round` is DESIGN.md section 3 end to end: proposals from the received model (which
is also the frozen reference), judge scores, mined pairs, N optimizer steps of RN-DPO (or DPO,
pseudo-labelling, entropy minimisation), and the judge's reliability on the calibration split.
It returns only aggregate numbers; the weights stay in the model the caller passed in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.config import AggregationConfig, JudgeConfig, MiningConfig, PreferenceConfig, ProposalConfig, SupervisedConfig
from shared.data import SplitData
from shared.losses import dpo_loss, entropy_loss, preference_stats, rn_dpo_loss, supervised_loss
from shared.judges.oracle import bind_to
from shared.mining import MinedPairs, mine_split
from shared.model import autocast, grad_scaler
from shared.proposals import plain_inference

log = logging.getLogger(__name__)

PAIR_LOSSES = {"rn_dpo": rn_dpo_loss, "dpo": dpo_loss}


@dataclass
class RoundResult:
    """What a round reports: the example count FedAvg weighs by, and aggregate metrics."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    pairs: MinedPairs | None = None  # stays at the site: used for local overlays, never sent


def supervised_round(
    model: torch.nn.Module,
    labeled: SplitData,
    cfg: SupervisedConfig,
    device: torch.device,
    seed: int = 0,
    progress: Callable | None = None,
) -> RoundResult:
    """`cfg.steps` DiceCE steps on random flipped batches of the labelled split."""
    _require_masks(labeled, "labeled")
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(device)
    loss_fn = supervised_loss()
    losses = []
    for _ in _steps(cfg.steps, progress, "supervised"):
        idx = torch.randint(len(labeled.names), (min(cfg.batch_size, len(labeled.names)),), generator=generator)
        images, masks = _random_flips(labeled.images[idx], labeled.masks[idx].float(), generator)
        losses.append(supervised_step(model, optimizer, loss_fn, images, masks, device, scaler))
    return RoundResult(
        num_examples=len(labeled.names),
        metrics={"loss": float(np.mean(losses[-10:])), "steps": cfg.steps},
    )


# what a site reports of the judge on its calibration split, as rel_<key> (the ledger reads these)
CALIBRATION_FIGURES = ("pair_accuracy", "spearman", "pair_gain", "n_pairs", "images", "n_ranked_images",
                       "dice_identity", "dice_best", "dice_pick", "dice_chosen", "chosen_over_identity",
                       "implausible_fraction", "informative_pairs", "informative_pair_accuracy",
                       "informative_units", "informative_wilson")


def calibration_reliability(
    model: torch.nn.Module,
    calibration: SplitData,
    judge,
    mining: MiningConfig,
    proposals_cfg: ProposalConfig,
    device: torch.device,
    seed: int = 0,
    informative_gap: float = AggregationConfig.informative_gap,
) -> tuple[dict, MinedPairs | None]:
    """Judge the model's proposals on the calibration split through the same pipeline as the
    unlabelled data (``mine_split``), and compare with ground truth (DESIGN.md section 3, step 5).

    Returns the figures of CALIBRATION_FIGURES (``images`` renamed ``n_images``): the judge's
    reliability, its informative pairs (true-Dice gap ``informative_gap``) and the round's headroom
    (identity, best-of-K and judge-pick Dice). ``mining`` should be the consortium's base settings,
    not a site's probation ones: the ledger's figure must not move because the site's state did.
    ``informative_units`` counts the split's `data.groups` groups (videos, patients) that hold
    informative pairs, or its images when it has none (``reliability.informative_report``)."""
    _require_masks(calibration, "calibration")
    pairs, stats = mine_split(model, calibration.images, bind_to(judge, calibration.masks), mining, proposals_cfg,
                              device, truth=calibration.masks, seed=seed, informative_gap=informative_gap,
                              units=group_units(calibration))
    figures = {("n_images" if key == "images" else key): stats[key] for key in CALIBRATION_FIGURES}
    return figures, pairs if len(pairs) else None


def group_units(split: SplitData) -> torch.Tensor | None:
    """(N,) each image's `data.groups` group as an index, or None when the split has no groups."""
    if split.groups is None:
        return None
    return torch.as_tensor(np.unique(split.groups, return_inverse=True)[1], dtype=torch.long)


def preference_round(
    model: torch.nn.Module,
    unlabeled: SplitData,
    calibration: SplitData,
    labeled: SplitData | None,
    judge,
    cfg: PreferenceConfig,
    device: torch.device,
    seed: int = 0,
    progress: Callable | None = None,
    reference: torch.nn.Module | None = None,
    calibration_mining: MiningConfig | None = None,
    informative_gap: float = AggregationConfig.informative_gap,
) -> RoundResult:
    """Proposals -> judge -> mining -> `cfg.steps` preference steps -> reliability.

    Calibration is mined with `calibration_mining` (the consortium's base settings the server
    sends; None: `cfg.mining`), so a site on probation trains differently but is measured alike.

    The model passed in is the received global model: its eval-mode logits, cached with each
    pair at mining, are the frozen DPO reference, so the reference never runs inside a step.
    Steps run with dropout off (eval mode) so that policy and reference agree at step 0.
    A `reference` model given (`preference.reference: base`) replaces those cached logits with
    its own: proposals still come from the received model, the reference stays fixed.

    `cfg.min_pick_gain` gates the preference term on the round's own evidence: when, on the
    calibration split, the judge's top pick (what top_bottom and top_identity train toward) does
    not beat the model's own mask by that much mean Dice, following the judge cannot be expected
    to help, and the round takes the control's anchor-only steps instead (metric `gated` 1). The
    server then weighs the site as it weighs the control: by labelled images, without its judge's
    factor (`aggregation.site_weights`: the judge steered nothing).
    """
    if cfg.supervise_unlabeled and cfg.method != "none":
        raise ValueError("preference.supervise_unlabeled is the all_labelled control: it needs method none")
    model.to(device)
    reliability, calib_pairs = calibration_reliability(
        model, calibration, judge, calibration_mining or cfg.mining, cfg.proposals, device, seed, informative_gap
    )
    metrics = {f"rel_{k}": float(v) for k, v in reliability.items()}
    # no calibration image is no evidence: gated too
    gated = (cfg.method not in ("none", "entropy") and cfg.min_pick_gain is not None
             and (reliability["n_images"] == 0
                  or reliability["dice_pick"] - reliability["dice_identity"] < cfg.min_pick_gain))
    if cfg.min_pick_gain is not None:
        metrics["gated"] = float(gated)
    if gated:
        cfg = dataclasses.replace(cfg, method="none")
    if cfg.method == "none":
        # The control arm: no preference loss. With lambda_sup > 0 it takes the same number of
        # anchor-only (supervised) steps, so a method's gain can be told from more supervision.
        # `supervise_unlabeled` (the all_labelled upper bound) anchors on the unlabelled pool's
        # true masks too: what labelling the pool would bring with the same steps.
        metrics["pairs_used"] = 0
        if cfg.supervise_unlabeled:
            _require_masks(unlabeled, "unlabeled")
            labeled = concat_splits(labeled, unlabeled) if labeled is not None else unlabeled
        if cfg.lambda_sup == 0 or labeled is None or len(labeled.names) == 0:
            return RoundResult(num_examples=0, metrics=metrics, pairs=calib_pairs)
        metrics.update(_preference_steps(model, unlabeled, labeled, None, cfg, device, seed, progress))
        return RoundResult(num_examples=len(labeled.names), metrics=metrics, pairs=calib_pairs)

    pool = sample_unlabeled(unlabeled, cfg.max_unlabeled, seed)
    # the unlabelled masks (simulation only) reach the oracle and the measurements, never another judge
    pairs, mining_stats = mine_split(
        model, pool.images, bind_to(judge, pool.masks),
        cfg.mining, cfg.proposals, device, truth=pool.masks, seed=seed, units=group_units(pool),
    )
    metrics.update({f"mining_{k}": float(v) for k, v in mining_stats.items() if _is_number(v)})
    metrics["pairs_used"] = len(pairs)
    if reference is not None and len(pairs):
        pairs = dataclasses.replace(pairs, ref_logits=reference_logits(reference, pool.images, pairs.image_index, device))
    if len(pairs) == 0 if cfg.method != "entropy" else len(pool.names) == 0:
        log.warning("no preference pairs survived mining: the model is left unchanged this round")
        return RoundResult(num_examples=0, metrics=metrics, pairs=calib_pairs)

    train_stats = _preference_steps(model, pool, labeled, pairs, cfg, device, seed, progress)
    metrics.update(train_stats)
    examples = len(pairs) if cfg.method != "entropy" else len(pool.names)
    return RoundResult(num_examples=examples, metrics=metrics, pairs=calib_pairs)


def reference_logits(reference: torch.nn.Module, images: torch.Tensor, image_index: torch.Tensor,
                     device: torch.device) -> torch.Tensor:
    """The reference's eval-mode logits for each pair's image, one forward per distinct image."""
    distinct, pair_to_distinct = image_index.unique(return_inverse=True)
    return plain_inference(reference.to(device), images.index_select(0, distinct), device)[pair_to_distinct]


def _preference_steps(model, pool: SplitData, labeled, pairs: MinedPairs, cfg: PreferenceConfig,
                      device, seed: int, progress) -> dict:
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(device)
    sup_loss_fn = supervised_loss()
    use_anchor = cfg.lambda_sup > 0 and labeled is not None and len(labeled.names) > 0
    model.eval()  # dropout off: the cached reference logits were made in eval mode
    history: dict[str, list[float]] = {"loss": [], "pref_loss": [], "sup_loss": [], "margin": [], "reward_acc": []}
    for _ in _steps(cfg.steps, progress, cfg.method):
        batch, images = _step_inputs(pool, pairs, cfg, generator)
        anchor = None
        if use_anchor:
            sup_idx = torch.randint(len(labeled.names), (min(cfg.batch_pairs, len(labeled.names)),), generator=generator)
            anchor = _random_flips(labeled.images[sup_idx], labeled.masks[sup_idx].float(), generator)
        for key, value in preference_step(model, optimizer, cfg, images, batch, pairs, device, anchor, sup_loss_fn, scaler).items():
            history[key].append(value)
    return {k: float(np.mean(v)) for k, v in history.items() if v} | {"steps": cfg.steps}


def supervised_step(model, optimizer, loss_fn, images: torch.Tensor, masks: torch.Tensor, device,
                    scaler=None) -> float:
    """One supervised optimizer step: one forward of (B, C, H, W) images, loss against float
    (B, 1, H, W) masks in float32, backward, step. Returns the loss."""
    with autocast(device):
        logits = model(images.to(device))
    loss = loss_fn(logits.float(), masks.to(device))
    _optimizer_step(optimizer, loss, scaler)
    return loss.item()


def preference_step(model, optimizer, cfg: PreferenceConfig, images: torch.Tensor, batch, pairs: MinedPairs,
                    device, anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
                    sup_loss_fn=None, scaler=None) -> dict[str, float]:
    """One preference optimizer step: a single forward serves the batch and the anchor.

    Args:
        images: (U, C, H, W) the unique unlabelled images of the batch (from `_step_inputs`).
        batch: `(pair_idx, inverse)` for pair methods (pair `pair_idx[i]` belongs to image
            `inverse[i]` of `images`), None for entropy.
        anchor: labelled `(images (B, C, H, W), float masks (B, 1, H, W))` for the `lambda_sup`
            term, or None; `sup_loss_fn` is its loss (a fresh `supervised_loss()` when None).
            The cached `pairs.ref_logits` stand in for the reference model, which never runs here.

    Returns:
        the step's figures: loss, pref_loss, and sup_loss / margin / reward_acc where they apply.
    """
    n_pool = len(images)
    if anchor is not None:
        images = torch.cat([images, anchor[0]])
    with autocast(device):
        logits = model(images.to(device))
    logits = logits.float()
    stats: dict[str, float] = {}
    pref = _method_loss(cfg, logits[:n_pool], batch, pairs, device, stats)
    loss = pref
    if anchor is not None:
        sup = (sup_loss_fn or supervised_loss())(logits[n_pool:], anchor[1].to(device))
        loss = pref + cfg.lambda_sup * sup
        stats["sup_loss"] = sup.item()
    _optimizer_step(optimizer, loss, scaler)
    stats["loss"] = loss.item()
    stats["pref_loss"] = pref.item()
    return stats


def _step_inputs(pool: SplitData, pairs: MinedPairs, cfg: PreferenceConfig, generator):
    """Sample a batch; return (batch info, the unique images to forward).

    For pair methods, one forward per unique image serves every pair of that image.
    """
    if cfg.method == "none":
        return None, pool.images[:0]
    if cfg.method == "entropy":
        idx = torch.randint(len(pool.names), (min(cfg.batch_pairs, len(pool.names)),), generator=generator)
        return None, pool.images[idx]
    pair_idx = torch.randint(len(pairs), (min(cfg.batch_pairs, len(pairs)),), generator=generator)
    unique_images, inverse = pairs.image_index[pair_idx].unique(return_inverse=True)
    return (pair_idx, inverse), pool.images[unique_images]


def _method_loss(cfg: PreferenceConfig, logits, batch, pairs: MinedPairs, device, stats: dict) -> torch.Tensor:
    if cfg.method == "none":
        return logits.sum() * 0.0  # no preference term; keeps the graph for the anchor
    if cfg.method == "entropy":
        return entropy_loss(logits)
    pair_idx, inverse = batch
    policy = logits[inverse]
    chosen = pairs.chosen[pair_idx].to(device)
    if cfg.method == "pseudo_label":
        return supervised_loss()(policy, chosen.float())
    ref = pairs.ref_logits[pair_idx].to(device)
    rejected = pairs.rejected[pair_idx].to(device)
    loss = PAIR_LOSSES[cfg.method](policy, ref, chosen, rejected, cfg.beta)
    figures = preference_stats(policy.detach(), ref, chosen, rejected)
    stats["margin"] = figures["norm_margin"]
    stats["reward_acc"] = figures["reward_acc"]
    return loss


def prepare_learned_judge(judge_cfg: JudgeConfig, work_dir, labeled: SplitData, model_factory: Callable,
                          supervised: SupervisedConfig, proposals_cfg: ProposalConfig,
                          device: torch.device, progress: Callable | None = None, seed: int = 0):
    """Train the site's learned judge once on out-of-fold proposals, or load it from work_dir.

    k segmenters, each trained on k-1 folds of the labelled split, propose masks for the fold
    they never saw (DESIGN.md: in-sample proposals are near perfect and teach the judge nothing).
    A saved judge trained with other settings (steps, folds, ranking term, seed) is trained again;
    one saved before its settings were recorded is kept.
    """
    from shared.judge_training import fold_groups, out_of_fold_proposals
    from shared.judges.learned import JUDGE_FILE, LearnedJudge

    settings = {"train_steps": judge_cfg.train_steps, "folds": judge_cfg.folds, "rank_weight": judge_cfg.rank_weight,
                "seed": judge_cfg.seed,
                # folds kept whole by group (data.groups): a judge saved before is trained again
                **({"folds_by_group": True} if fold_groups(labeled) is not None else {})}
    if (Path(work_dir) / JUDGE_FILE).exists():  # trained in an earlier round
        saved = LearnedJudge.load(work_dir, in_channels=labeled.images.shape[1], image_size=labeled.images.shape[-1])
        if saved.stats.get("settings", settings) == settings:
            return saved
        log.info("learned judge at %s was trained with other settings: trained again", work_dir)
    _require_masks(labeled, "labeled")
    oof = out_of_fold_proposals(labeled, model_factory, supervised, proposals_cfg, judge_cfg.folds, device, seed, progress)
    judge = LearnedJudge(in_channels=labeled.images.shape[1], image_size=labeled.images.shape[-1], seed=judge_cfg.seed)
    stats = judge.fit(labeled.images, labeled.masks, oof, steps=judge_cfg.train_steps, device=device,
                      rank_weight=judge_cfg.rank_weight)
    judge.stats["settings"] = settings
    judge.save(work_dir)
    log.info("learned judge trained at %s: %s", work_dir, stats)
    return judge


# ----------------------------------------------------------------------------- helpers


def _steps(n: int, progress: Callable | None, label: str):
    return progress(range(n), label) if progress else range(n)


def _random_flips(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
    """Flip each (image, mask) pair horizontally and/or vertically at random, together."""
    flip_h = torch.rand(len(images), generator=generator) < 0.5
    flip_v = torch.rand(len(images), generator=generator) < 0.5
    images, masks = images.clone(), masks.clone()
    images[flip_h] = images[flip_h].flip(-1)
    masks[flip_h] = masks[flip_h].flip(-1)
    images[flip_v] = images[flip_v].flip(-2)
    masks[flip_v] = masks[flip_v].flip(-2)
    return images, masks


def sample_unlabeled(split: SplitData, limit: int | None, seed: int) -> SplitData:
    """A fresh random sample of ``limit`` frames for this round (seeded by the round's seed), so
    that over a run the whole pool is used, not the first ``limit`` names every round."""
    if limit is None or len(split.names) <= limit:
        return split
    order = torch.randperm(len(split.names), generator=torch.Generator().manual_seed(seed + 7919))
    return subset(split, order[:limit].sort().values)


def concat_splits(a: SplitData, b: SplitData) -> SplitData:
    """Two labelled splits as one (copies)."""
    groups = list(a.groups) + list(b.groups) if a.groups is not None and b.groups is not None else None
    return SplitData(names=list(a.names) + list(b.names), images=torch.cat([a.images, b.images]),
                     masks=torch.cat([a.masks, b.masks]), groups=groups)


def subset(split: SplitData, index) -> SplitData:
    """The images at `index` as a new split (copies, so the parent tensors can be freed)."""
    index = torch.as_tensor(index, dtype=torch.long)
    return SplitData(
        names=[split.names[i] for i in index.tolist()],
        images=split.images[index].clone(),
        masks=None if split.masks is None else split.masks[index].clone(),
        groups=None if split.groups is None else [split.groups[i] for i in index.tolist()],
    )


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler=None) -> None:
    """Backward and step, through the round's GradScaler where float16 autocast needs one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _require_masks(split: SplitData, name: str) -> None:
    if split.masks is None:
        raise ValueError(f"the {name} split has no masks, but this step needs ground truth")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
