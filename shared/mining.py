"""Mining: judge scores -> preference pairs (chosen mask, rejected mask) of one image (DESIGN.md section 3, step 3).

Strategies (``MiningConfig.strategy``), each a list of candidate pairs per image in priority order:

- ``top_bottom``: the judge's best vs its worst proposal (one candidate);
- ``top_random``: the best vs the other proposals in random order (K - 1 candidates; the first
  that passes the filters is taken, up to ``max_pairs_per_image``);
- ``gap``: every pair (higher score chosen), largest score gap first;
- ``skip_top``: the second best vs the worst (one candidate), a hedge against a wrong top-1;
- ``top_identity``: the best vs the model's own prediction, the identity pass (one candidate):
  the step moves the model from what it says now toward what the judge prefers.

Proposals marked implausible (``shared.proposals.plausible``) are never chosen or rejected: the
ranking runs over the plausible ones (the identity pass always counts as plausible).

Filters, for every strategy: a candidate is dropped when its score gap is 0 (the judge has no
preference) or below ``min_gap``, when its disagreement region ``D = {chosen != rejected}`` is
empty (no preference can be learned from it), or when ``|D| / (H W) < min_disagreement``. The
first ``max_pairs_per_image`` surviving candidates of each image are kept.

Ties are broken deterministically: proposals are ranked by score, descending, equal scores by
ascending proposal index (the best of tied proposals is the lowest index, the worst the highest);
candidates of equal gap keep their ranked order.

``mine_split`` is the one pipeline every split goes through, unlabelled and calibration alike:
proposals -> judge -> mining, streamed chunk by chunk so that only the mined pairs (with their
masks and cached reference logits) are kept and memory grows with the pairs, not with the split.
Given the split's ground truth it also measures the judge (reliability) and the headroom of the
proposals: the Dice of the identity proposal, of the best of the K (what a perfect judge would
pick) and of the judge's pick. The judge itself never receives the truth.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.config import MINING_STRATEGIES, MiningConfig, ProposalConfig
from shared.judges.base import Judge, check_scores
from shared.proposals import ProposalSet, iter_proposals, plausible, proposal_labels
from shared.reliability import dice_scores, informative_report, reliability_report

__all__ = ["MinedPairs", "mine_pairs", "gather_pairs", "mine_split", "candidate_pairs", "headroom"]

_GATHER_BYTES = 32 * 2**20  # mask bytes gathered at once when measuring disagreement


@dataclass
class MinedPairs:
    """What preference training needs, per pair, compact and on the CPU.

    Attributes:
        image_index: (P,) int64, the image's index in the split.
        chosen, rejected: (P, 1, H, W) uint8 masks in {0, 1}.
        ref_logits: (P, 1, H, W) float32 logits of the frozen reference for the pair's image.
        score_gap: (P,) float32 judge score(chosen) - score(rejected); NaN when unknown.
        chosen_k, rejected_k: (P,) int64 proposal indices (into ProposalSet.labels), or None.
    """

    image_index: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_logits: torch.Tensor
    score_gap: torch.Tensor
    chosen_k: torch.Tensor | None = None
    rejected_k: torch.Tensor | None = None

    def __post_init__(self):
        p = self.image_index.shape[0]
        if self.image_index.shape != (p,) or self.chosen.dim() != 4 or self.chosen.shape[:2] != (p, 1):
            raise ValueError(f"image_index {tuple(self.image_index.shape)} and chosen {tuple(self.chosen.shape)} "
                             f"must be (P,) and (P, 1, H, W)")
        for name in ("rejected", "ref_logits"):
            t = getattr(self, name)
            if t.shape != self.chosen.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but chosen has {tuple(self.chosen.shape)}")
        for name in ("score_gap", "chosen_k", "rejected_k"):
            t = getattr(self, name)
            if t is not None and t.shape != (p,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({p},)")

    def __len__(self) -> int:
        return self.image_index.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.chosen.shape[2:])

    def disagreement_fraction(self) -> torch.Tensor:
        """(P,) float32: |D| / (H W), the fraction of pixels where chosen and rejected differ."""
        if len(self) == 0:
            return torch.zeros(0)
        return (self.chosen != self.rejected).flatten(1).float().mean(1)

    def subset(self, sel: torch.Tensor | Sequence[int] | slice) -> MinedPairs:
        """The selected pairs, as fresh tensors (never views of this object's tensors)."""
        idx = torch.arange(len(self))[sel] if isinstance(sel, slice) else torch.as_tensor(sel)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().reshape(-1)

        def take(t):
            return None if t is None else t.index_select(0, idx)

        return MinedPairs(*(take(getattr(self, f)) for f in _FIELDS))

    @classmethod
    def empty(cls, height: int, width: int) -> MinedPairs:
        """No pairs, for images of height x width."""
        masks = torch.zeros((0, 1, height, width), dtype=torch.uint8)
        return cls(
            image_index=torch.zeros(0, dtype=torch.long),
            chosen=masks,
            rejected=masks.clone(),
            ref_logits=torch.zeros((0, 1, height, width)),
            score_gap=torch.zeros(0),
            chosen_k=torch.zeros(0, dtype=torch.long),
            rejected_k=torch.zeros(0, dtype=torch.long),
        )

    @classmethod
    def concat(cls, parts: Sequence[MinedPairs]) -> MinedPairs:
        """Concatenate pairs of the same image size (chosen_k / rejected_k kept if all have them)."""
        if not parts:
            raise ValueError("MinedPairs.concat needs at least one MinedPairs (use MinedPairs.empty(h, w) for none)")
        size = parts[0].image_size
        for i, part in enumerate(parts):
            if part.image_size != size:
                raise ValueError(f"part {i} has images of size {part.image_size}, part 0 of size {size}")

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return cls(*(cat(f) for f in _FIELDS))


_FIELDS = ("image_index", "chosen", "rejected", "ref_logits", "score_gap", "chosen_k", "rejected_k")


def candidate_pairs(scores: torch.Tensor, strategy: str, generator: torch.Generator | None = None,
                    allowed: torch.Tensor | None = None, identity: int | None = None) -> torch.Tensor:
    """The strategy's candidate pairs of every image, before any filter.

    Args:
        scores: (N, K) judge scores, higher is better.
        strategy: one of MINING_STRATEGIES.
        generator: randomness of ``top_random`` (a generator seeded with 0 when None).
        allowed: (N, K) bool, the proposals that may be chosen or rejected (None: all). The
            others rank below every allowed one, so the best and worst are allowed ones where
            an image has any; ``mine_pairs`` drops candidates that still touch one.
        identity: the identity proposal's index, needed by ``top_identity``.

    Returns:
        (N, M, 2) int64 of (chosen k, rejected k), each image's M candidates in priority order.
    """
    if strategy not in MINING_STRATEGIES:
        raise ValueError(f"mining strategy {strategy!r} is not one of {', '.join(MINING_STRATEGIES)}")
    n, k = scores.shape
    s = scores.double()
    if allowed is not None:
        s = torch.where(allowed, s, s.min() - 1.0 - (s.max() - s.min()) if s.numel() else s)
    sorted_scores, order = torch.sort(s, dim=1, descending=True, stable=True)
    # the worst allowed proposal of each image (where none is allowed: the best, so the pair is
    # empty and mine_pairs drops it)
    n_allowed = allowed.sum(1) if allowed is not None else torch.full((n,), k)
    worst = order.gather(1, (n_allowed - 1).clamp_min(0).view(-1, 1)).view(-1)
    if strategy == "top_identity":
        if identity is None:
            raise ValueError("mining strategy top_identity needs the identity proposal: list identity in proposals.tta")
        return torch.stack([order[:, 0], torch.full((n,), identity)], dim=1).unsqueeze(1)
    if strategy == "top_bottom":
        return torch.stack([order[:, 0], worst], dim=1).unsqueeze(1)
    if strategy == "skip_top":
        second = order[:, min(1, k - 1)]
        return torch.stack([torch.where(n_allowed >= 2, second, order[:, 0]), worst], dim=1).unsqueeze(1)
    if strategy == "top_random":
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        keys = torch.rand((n, k), generator=generator, dtype=torch.float64)
        keys.scatter_(1, order[:, :1], 2.0)  # the best goes last, and is cut off
        others = keys.argsort(dim=1, stable=True)[:, : k - 1]
        return torch.stack([order[:, :1].expand(n, k - 1), others], dim=2)
    # gap: all pairs of ranked positions i < j, largest gap first (stable: ranked order on ties)
    i, j = torch.triu_indices(k, k, offset=1)
    gaps = sorted_scores[:, i] - sorted_scores[:, j]  # (N, M)
    priority = gaps.argsort(dim=1, descending=True, stable=True)
    return torch.stack([order[:, i].gather(1, priority), order[:, j].gather(1, priority)], dim=2)


def mine_pairs(
    scores: torch.Tensor,
    masks: torch.Tensor,
    cfg: MiningConfig,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    identity: int | None = None,
) -> torch.Tensor:
    """Preference pairs from judge scores (strategies, filters and ties: see the module docstring).

    Args:
        scores: (N, K) judge scores, higher is better, finite.
        masks: (N, K, H, W) the proposals (uint8 {0, 1}; nonzero is foreground).
        cfg: strategy, min_gap, min_disagreement (fraction of H W), max_pairs_per_image.
        generator: randomness of ``top_random``; a generator seeded with 0 when None.
        allowed: (N, K) bool, the plausible proposals (None: all); no pair touches another.
        identity: index of the identity proposal (``top_identity``; always allowed).

    Returns:
        (P, 3) int64 rows of (image index, chosen k, rejected k), by image, then priority.
    """
    _check_mining_inputs(scores, masks, cfg)
    n, k, h, w = masks.shape
    if n == 0 or k < 2:
        return torch.zeros((0, 3), dtype=torch.long)
    if allowed is not None and identity is not None:
        allowed = allowed.clone()
        allowed[:, identity] = True
    cand = candidate_pairs(scores, cfg.strategy, generator, allowed, identity)  # (N, M, 2)
    m = cand.shape[1]
    img = torch.arange(n).repeat_interleave(m)
    chosen, rejected = cand[..., 0].reshape(-1), cand[..., 1].reshape(-1)
    s = scores.double()
    gap = s[img, chosen] - s[img, rejected]
    keep = (gap > 0) & (gap >= cfg.min_gap)
    if allowed is not None:
        keep &= allowed[img, chosen] & allowed[img, rejected]
    img, chosen, rejected = img[keep], chosen[keep], rejected[keep]
    differ = _disagreement_counts(masks, img, chosen, rejected)
    keep = (differ > 0) & (differ.double() / (h * w) >= cfg.min_disagreement)
    img, chosen, rejected = img[keep], chosen[keep], rejected[keep]
    # cap: rank of each survivor within its image (survivors are grouped by image, in priority order)
    first = torch.searchsorted(img, img)
    keep = torch.arange(img.numel()) - first < cfg.max_pairs_per_image
    return torch.stack([img[keep], chosen[keep], rejected[keep]], dim=1)


def gather_pairs(
    proposals: ProposalSet,
    pairs: torch.Tensor,
    offset: int = 0,
    scores: torch.Tensor | None = None,
) -> MinedPairs:
    """The masks and reference logits of mined pairs, copied out of a ProposalSet.

    Args:
        proposals: the ProposalSet the pairs were mined from (N images).
        pairs: (P, 3) of (image index into ``proposals``, chosen k, rejected k).
        offset: added to the image index, so that it refers to the full split when
            ``proposals`` is one chunk starting at ``offset``.
        scores: (N, K) judge scores, for ``score_gap``; without them score_gap is NaN.

    Returns:
        MinedPairs with fresh tensors (no view keeps the ProposalSet alive).
    """
    n, k, h, w = proposals.masks.shape
    pairs = torch.as_tensor(pairs)
    if pairs.numel() == 0:
        return MinedPairs.empty(h, w)
    if pairs.dim() != 2 or pairs.shape[1] != 3 or pairs.dtype.is_floating_point:
        raise ValueError(f"pairs must be a (P, 3) integer tensor, got {tuple(pairs.shape)} {pairs.dtype}")
    pairs = pairs.long()
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= n or pairs[:, 1:].min() < 0 or pairs[:, 1:].max() >= k:
        raise ValueError(f"pairs index images up to {pairs[:, 0].max().item()} and proposals up to "
                         f"{pairs[:, 1:].max().item()}, but the proposals' masks are {tuple(proposals.masks.shape)}")
    img, c, r = pairs.unbind(1)
    if scores is not None:
        if tuple(scores.shape) != (n, k):
            raise ValueError(f"scores have shape {tuple(scores.shape)}, expected {(n, k)} from masks {tuple(proposals.masks.shape)}")
        gap = (scores.double()[img, c] - scores.double()[img, r]).float()
    else:
        gap = torch.full((len(pairs),), float("nan"))
    return MinedPairs(
        image_index=img + int(offset),
        chosen=proposals.masks[img, c].unsqueeze(1).contiguous(),  # advanced indexing copies
        rejected=proposals.masks[img, r].unsqueeze(1).contiguous(),
        ref_logits=proposals.ref_logits.index_select(0, img),
        score_gap=gap,
        chosen_k=c.clone(),
        rejected_k=r.clone(),
    )


def mine_split(
    model: torch.nn.Module,
    images: torch.Tensor,
    judge: Judge,
    cfg_mining: MiningConfig,
    cfg_proposals: ProposalConfig,
    device: torch.device | str,
    truth: torch.Tensor | None = None,
    chunk_size: int = 64,
    seed: int = 0,
    informative_gap: float = 0.05,
    units: torch.Tensor | None = None,
) -> tuple[MinedPairs, dict]:
    """Proposals -> judge -> mining over a whole split, chunk by chunk, keeping only the pairs.

    The one pipeline of a preference round: the unlabelled sample and the calibration split both
    go through it, so the judge is measured on calibration exactly as it is used.

    Args:
        model: the received model (the frozen reference), on ``device``.
        images: (N, C, H, W).
        judge: scores each chunk's proposals from the images and proposals alone (an oracle
            must already be bound to this split's masks: ``shared.judges.oracle.bind_to``).
        cfg_mining, cfg_proposals: how to mine, how to propose (and which proposals are plausible).
        truth: (N, 1, H, W) ground truth or None. Used only to measure: the judge never gets it.
        chunk_size: images per chunk (rounded as in ``iter_proposals``); bounds memory.
        seed: seeds the MC-dropout proposals and the ``top_random`` choices.
        informative_gap: with truth, the true-Dice gap of the informative pairs
            (``reliability.informative_report``; measured over plausible proposals, not mined pairs).
        units: with truth, (N,) each image's unit, counted in ``informative_units`` (its
            `data.groups` group); None: every image is its own.

    Returns:
        ``(pairs, stats)``: MinedPairs with ``image_index`` into ``images``, and plain numbers:
        ``images``, ``proposals_per_image``, ``pairs``, ``pairs_per_image``, ``images_with_pairs``,
        ``implausible_fraction`` (share of proposals mining ignored), ``score_gap_mean``,
        ``disagreement_q10 / q50 / q90`` (fractions of the image; all 0.0 without pairs),
        ``seconds_proposals / seconds_judge / seconds_mining``, and with truth the keys of
        ``reliability_report`` (pair_accuracy, spearman, pair_gain, ...), of ``informative_report``
        (informative_pairs, informative_pair_accuracy, informative_units, informative_wilson) and
        the headroom:
        ``dice_identity`` (mean true Dice of the model's own prediction), ``dice_best`` (of the
        best plausible proposal: what a perfect judge would pick), ``dice_pick`` (of the judge's
        top plausible proposal), ``dice_chosen`` (of the chosen masks of the mined pairs) and
        ``chosen_over_identity`` (their gain over the model's own prediction of the same image).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if truth is not None and tuple(truth.shape) != (n, 1, h, w):
        raise ValueError(f"truth has shape {tuple(truth.shape)} but images are {tuple(images.shape)}: expected ({n}, 1, {h}, {w})")
    labels = proposal_labels(cfg_proposals)
    identity = labels.index("tta:identity") if "tta:identity" in labels else None
    generator = torch.Generator().manual_seed(seed)
    parts: list[MinedPairs] = []
    measured: dict[str, list[torch.Tensor]] = {"scores": [], "dice": [], "pairs": [], "allowed": [], "identity": []}
    implausible = 0
    seconds = {"proposals": 0.0, "judge": 0.0, "mining": 0.0}
    chunks = iter_proposals(model, images, cfg_proposals, device, chunk_size=chunk_size, seed=seed)
    while True:
        t0 = time.perf_counter()
        item = next(chunks, None)
        t1 = time.perf_counter()
        seconds["proposals"] += t1 - t0
        if item is None:
            break
        start, proposals = item
        scores = check_scores(judge.score(images[start : start + len(proposals)], proposals), proposals, judge.name)
        t2 = time.perf_counter()
        allowed = plausible(proposals, cfg_proposals.max_area_ratio)
        if identity is not None:
            allowed[:, identity] = True
        implausible += int((~allowed).sum())
        pairs = mine_pairs(scores, proposals.masks, cfg_mining, generator, allowed, identity)
        parts.append(gather_pairs(proposals, pairs, offset=start, scores=scores))
        if truth is not None:
            chunk_truth = truth[start : start + len(proposals)]
            measured["scores"].append(scores)
            measured["dice"].append(dice_scores(proposals.masks, chunk_truth))
            measured["pairs"].append(pairs + torch.tensor([start, 0, 0]))
            measured["allowed"].append(allowed)
            measured["identity"].append(dice_scores((proposals.ref_logits > 0).to(torch.uint8), chunk_truth)[:, 0])
        seconds["judge"] += t2 - t1
        seconds["mining"] += time.perf_counter() - t2
        del item, proposals, scores  # the chunk's proposals go before the next is made; only its pairs stay

    mined = MinedPairs.concat(parts) if parts else MinedPairs.empty(h, w)
    k = len(labels)
    stats = _summary(mined, n, k)
    stats["implausible_fraction"] = implausible / (n * k) if n * k else 0.0
    stats.update({f"seconds_{name}": round(value, 4) for name, value in seconds.items()})
    if truth is not None:
        if measured["scores"]:
            table = {key: torch.cat(values) for key, values in measured.items()}
        else:
            table = {"scores": torch.zeros(0, k), "dice": torch.zeros(0, k), "pairs": torch.zeros(0, 3, dtype=torch.long),
                     "allowed": torch.zeros(0, k, dtype=torch.bool), "identity": torch.zeros(0)}
        stats.update(reliability_report(table["scores"], table["dice"], table["pairs"]))
        stats.update(informative_report(table["scores"], table["dice"], table["allowed"], informative_gap, units))
        stats.update(headroom(table["scores"], table["dice"], table["allowed"], table["identity"], table["pairs"]))
        stats.pop("n_images", None)  # same as "images"
    return mined, stats


def headroom(scores: torch.Tensor, true_dice: torch.Tensor, allowed: torch.Tensor, identity_dice: torch.Tensor,
             pairs: torch.Tensor) -> dict:
    """What a round can gain and how much of it the judge captures, as mean true Dice over images.

    Args:
        scores, true_dice: (N, K); allowed: (N, K) bool, the plausible proposals;
        identity_dice: (N,) true Dice of the model's own (identity) prediction;
        pairs: (P, 3) mined pairs of (image, chosen k, rejected k).

    Returns:
        ``dice_identity``, ``dice_best`` (the best plausible proposal), ``dice_pick`` (the judge's
        top plausible proposal), ``dice_chosen`` (mean over the pairs' chosen masks) and
        ``chosen_over_identity`` (mean over the pairs of Dice(chosen) - Dice(identity) of the
        pair's image: what moving the model toward the chosen masks would gain); the last two are
        0.0 without pairs. All 0.0 for no images.
    """
    n = true_dice.shape[0]
    if n == 0:
        return {"dice_identity": 0.0, "dice_best": 0.0, "dice_pick": 0.0, "dice_chosen": 0.0,
                "chosen_over_identity": 0.0}
    none = ~allowed.any(1, keepdim=True)
    allowed = allowed | none  # an image with no plausible proposal: all of them count
    best = torch.where(allowed, true_dice, torch.full_like(true_dice, -1.0)).max(1).values
    masked_scores = torch.where(allowed, scores.double(), torch.full_like(scores, float("-inf"), dtype=torch.float64))
    pick = true_dice.gather(1, masked_scores.argmax(1, keepdim=True))[:, 0]
    pairs = torch.as_tensor(pairs).long().reshape(-1, 3)
    chosen = true_dice[pairs[:, 0], pairs[:, 1]].double() if len(pairs) else torch.zeros(0, dtype=torch.float64)
    gain = chosen - identity_dice.double()[pairs[:, 0]] if len(pairs) else chosen
    return {"dice_identity": float(identity_dice.double().mean()), "dice_best": float(best.double().mean()),
            "dice_pick": float(pick.double().mean()),
            "dice_chosen": float(chosen.mean()) if len(chosen) else 0.0,
            "chosen_over_identity": float(gain.mean()) if len(gain) else 0.0}


# ----------------------------------------------------------------------------- internals


def _summary(mined: MinedPairs, n_images: int, k: int) -> dict:
    p = len(mined)
    stats = {
        "images": n_images,
        "proposals_per_image": k,
        "pairs": p,
        "pairs_per_image": p / n_images if n_images else 0.0,
        "images_with_pairs": int(mined.image_index.unique().numel()),
        "score_gap_mean": 0.0,
        "disagreement_q10": 0.0,
        "disagreement_q50": 0.0,
        "disagreement_q90": 0.0,
    }
    if p:
        gaps = mined.score_gap[torch.isfinite(mined.score_gap)]
        stats["score_gap_mean"] = float(gaps.mean()) if gaps.numel() else 0.0
        q = torch.quantile(mined.disagreement_fraction().double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        stats.update({"disagreement_q10": float(q[0]), "disagreement_q50": float(q[1]), "disagreement_q90": float(q[2])})
    return stats


def _disagreement_counts(masks: torch.Tensor, img: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P,) int64 |m_a xor m_b| for pairs of proposals (img, a) and (img, b), gathered in blocks."""
    h, w = masks.shape[2:]
    out = torch.zeros(img.numel(), dtype=torch.long)
    block = max(1, _GATHER_BYTES // max(1, 2 * h * w))
    for start in range(0, img.numel(), block):
        sl = slice(start, start + block)
        out[sl] = ((masks[img[sl], a[sl]] != 0) != (masks[img[sl], b[sl]] != 0)).flatten(1).sum(1)
    return out


def _check_mining_inputs(scores: torch.Tensor, masks: torch.Tensor, cfg: MiningConfig) -> None:
    if cfg.strategy not in MINING_STRATEGIES:
        raise ValueError(f"mining strategy {cfg.strategy!r} is not one of {', '.join(MINING_STRATEGIES)}")
    if cfg.max_pairs_per_image < 1:
        raise ValueError(f"max_pairs_per_image must be >= 1, got {cfg.max_pairs_per_image}")
    if scores.dim() != 2 or masks.dim() != 4 or tuple(scores.shape) != tuple(masks.shape[:2]):
        raise ValueError(f"scores {tuple(scores.shape)} must be (N, K) for masks (N, K, H, W) {tuple(masks.shape)}")
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = (~finite).any(1).nonzero().flatten()
        raise ValueError(f"scores contain NaN or Inf for images {bad[:10].tolist()}: the judge is broken")
