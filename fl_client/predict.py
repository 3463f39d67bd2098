"""`fl-client predict --model M --images DIR --out DIR`: segment a folder of new scans.

One mask per input, in the input's format and at its original size (PNG/JPEG in -> PNG out,
0/255; NIfTI in -> NIfTI out, 0/1, with the input's affine and header), optional overlays, and
`predictions.csv`: per image the foreground area, the learned judge's predicted Dice (when the
site has a trained judge) and whether a reviewer should look at it. Preprocessing is the
training reader's (`shared.inference`), so the masks are those `python -m monai.bundle run`
writes from the exported bundle. Unreadable files are skipped and listed (exit code 1); inputs
are never overwritten.
"""

from __future__ import annotations

import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared import bundle
from shared.config import ConfigError, device_problem
from shared.data import BadFile
from shared.inference import (InferenceSpec, Loaded, default_checkpoint, image_stem, is_image_file, is_nifti,
                              load_image, mask_at, spec_from_run_dir)
from shared.model import load_state, resolve_device
from shared.site import model_from_config

CSV_NAME = "predictions.csv"
OVERLAYS = "overlays"
COLUMNS = ("image", "mask", "height", "width", "foreground_pixels", "foreground_fraction",
           "predicted_dice", "judge", "review", "reason")


@dataclass
class Options:
    review_below: float = 0.7  # predicted Dice under this: look at it
    max_fraction: float = 0.9  # a mask covering more of the image than this: look at it
    batch_size: int = bundle.BATCH_SIZE
    overlays: bool = False
    force: bool = False


# ----------------------------------------------------------------------------- the model


def load_predictor(model: Path) -> tuple[torch.nn.Module, InferenceSpec, str]:
    """Network, input settings and a description, from a bundle, a run dir or a checkpoint."""
    model = Path(model)
    if model.is_dir() and bundle.is_bundle(model):
        spec, weights, what = bundle.read_spec(model), model / bundle.WEIGHTS, f"bundle {model}"
    elif model.is_dir() and (model / "config.yaml").is_file():
        weights, why = default_checkpoint(model)
        spec, what = spec_from_run_dir(model), f"{weights} ({why})"
    elif model.is_file():
        run_dir = next((p for p in (model.parent, model.parent.parent) if (p / "config.yaml").is_file()), None)
        if run_dir is None:
            raise ConfigError(f"{model}: no config.yaml beside it or in the folder above, so the network is "
                              "unknown; give the run directory or an exported bundle (fl-server export)")
        spec, weights, what = spec_from_run_dir(run_dir), model, f"{model}"
    else:
        raise ConfigError(f"{model}: not a bundle (configs/metadata.json + models/model.pt), a run directory "
                          "(config.yaml + checkpoints/) or a checkpoint file")
    net = model_from_config(spec.model)
    try:
        net.load_state_dict(load_state(weights))
    except Exception as exc:
        raise ConfigError(f"{weights}: does not fit the network {spec.model.name} "
                          f"({str(exc).splitlines()[0]})") from None
    return net.eval(), spec, what


def load_judge(path: Path | None, spec: InferenceSpec):
    """(judge or None, a word for the CSV): a learned judge file or a work dir that holds one."""
    if path is None:
        return None, "none (no learned judge: pass --judge or --site with a trained learned judge)"
    from shared.judges.learned import JUDGE_FILE, LearnedJudge

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name != JUDGE_FILE:
        raise ConfigError(f"{path}: a learned judge file is named {JUDGE_FILE}; give it or its folder")
    if not (folder / JUDGE_FILE).is_file():
        return None, f"none ({folder / JUDGE_FILE} not found: the site has not trained a learned judge)"
    try:
        judge = LearnedJudge.load(folder)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if (judge.image_size, judge.in_channels) != (spec.image_size, spec.channels):
        return None, (f"none ({folder / JUDGE_FILE} is for {judge.in_channels}-channel {judge.image_size} px "
                      f"images, the model takes {spec.channels}-channel {spec.image_size} px)")
    return judge, f"learned ({folder / JUDGE_FILE})"


# ----------------------------------------------------------------------------- planning


def output_name(path: Path) -> str:
    """The mask's file name: PNG for PNG/JPEG, the input's own NIfTI suffix for NIfTI."""
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    return image_stem(path) + (suffix if is_nifti(path) else ".png")


def plan(images: Path, out: Path, overlays: bool, force: bool) -> tuple[list[Path], list[str]]:
    """The input files (sorted) and the problems found before any work (skipped files)."""
    if not images.is_dir():
        raise ConfigError(f"{images}: --images is not a folder")
    src, dst = images.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise ConfigError(f"{out}: --out is {'--images itself' if dst == src else 'inside --images'}; "
                          "predictions never go next to the inputs, choose another folder")
    files, skipped, taken = [], [], {}
    for path in sorted(images.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not is_image_file(path):
            continue
        name = output_name(path)
        if name in taken:
            skipped.append(f"{path}: its mask {name} would overwrite the mask of {taken[name].name} (same name)")
            continue
        taken[name] = path
        files.append(path)
    if not files and not skipped:
        raise ConfigError(f"{images}: no images (.png, .jpg, .jpeg, .nii, .nii.gz)")
    if not force:
        targets = [out / CSV_NAME] + [out / output_name(p) for p in files]
        targets += [out / OVERLAYS / f"{image_stem(p)}.png" for p in files] if overlays else []
        existing = [t for t in targets if t.exists()]
        if existing:
            raise ConfigError(f"{existing[0]}: already exists ({len(existing)} output file(s) in {out}); "
                              "pass --force to replace them or choose another --out")
    return files, skipped


# ----------------------------------------------------------------------------- running


def predict(model: Path, images: Path, out: Path, judge_path: Path | None = None, options: Options | None = None,
            device: str = "auto", progress: bool = True) -> int:
    """Segment every image of `images` into `out`; 0, or 1 when a file was skipped."""
    options = options or Options()
    if options.batch_size < 1:
        raise ConfigError(f"--batch-size: {options.batch_size} images per pass; give a positive number")
    problem = device_problem(device)
    if problem:  # before any file is read, not a traceback after
        raise ConfigError(f"--device: {problem}")
    images, out = Path(images), Path(out)
    files, skipped = plan(images, out, options.overlays, options.force)
    net, spec, what = load_predictor(model)
    judge, judge_word = load_judge(judge_path, spec)
    dev = resolve_device(device)
    net.to(dev)
    if judge is not None:
        judge.to(dev)
    out.mkdir(parents=True, exist_ok=True)
    if options.overlays:
        (out / OVERLAYS).mkdir(exist_ok=True)
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(files), desc="predict", unit="img", file=sys.stderr, disable=not progress or None)
    # reading and writing overlap the network: decoding and encoding release the GIL
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = []
        for batch, bad in _batches(pool, files, spec, options.batch_size):
            skipped += bad
            bar.update(len(bad))
            if not batch:
                continue
            x = torch.stack([b.tensor for b in batch]).to(dev)
            with torch.inference_mode():
                logits = net(x).float().cpu()
            masks = [mask_at(logits[i], b.size) for i, b in enumerate(batch)]
            scores = _judge_scores(judge, x, logits) if judge is not None else [None] * len(batch)
            for item, mask, score in zip(batch, masks, scores):
                target = out / output_name(item.path)
                writes.append(pool.submit(_write, item, mask, target, out / OVERLAYS if options.overlays else None))
                rows.append(_row(item, mask, target, score, judge_word, options))
            bar.update(len(batch))
        for w in writes:
            w.result()
    bar.close()
    _write_csv(out / CSV_NAME, rows)
    flagged = sum(1 for r in rows if r["review"] == "yes")
    print(f"{out}: {len(rows)} mask(s) written from {what}, {flagged} to review, judge: {judge_word}; "
          f"table {out / CSV_NAME}")
    for line in skipped:
        print(f"error: {line}")
    if skipped:
        print(f"{images}: {len(skipped)} file(s) skipped (listed above)")
        return 1
    return 0


def _batches(pool, files: list[Path], spec: InferenceSpec, size: int):
    """(readable images, skipped lines) per batch of `size` files, read one batch ahead."""
    def read(path):
        try:
            return load_image(path, spec.image_size, spec.channels)
        except BadFile as exc:
            return str(exc.problem)

    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    ahead = [pool.submit(lambda c=c: [read(p) for p in c]) for c in chunks[:1]]
    for i in range(len(chunks)):
        if i + 1 < len(chunks):
            ahead.append(pool.submit(lambda c=chunks[i + 1]: [read(p) for p in c]))
        results = ahead[i].result()
        ahead[i] = None
        yield [r for r in results if isinstance(r, Loaded)], [r for r in results if isinstance(r, str)]


def _judge_scores(judge, x: torch.Tensor, logits: torch.Tensor) -> list[float]:
    masks = (logits > 0).to(torch.uint8)  # (B, 1, S, S): the mask at the model's resolution
    from types import SimpleNamespace

    return [float(v) for v in judge.score(x.cpu(), SimpleNamespace(masks=masks))[:, 0]]


def _row(item: Loaded, mask: np.ndarray, target: Path, score: float | None, judge_word: str, options: Options) -> dict:
    area = int(mask.sum())
    fraction = area / mask.size
    reasons = []
    if area == 0:
        reasons.append("empty mask")
    elif fraction > options.max_fraction:
        reasons.append(f"mask covers {fraction:.0%} of the image (> {options.max_fraction:.0%})")
    if score is not None and score < options.review_below:
        reasons.append(f"predicted Dice {score:.2f} < {options.review_below:.2f}")
    return {"image": item.path.name, "mask": target.name, "height": item.size[0], "width": item.size[1],
            "foreground_pixels": area, "foreground_fraction": f"{fraction:.4f}",
            "predicted_dice": "" if score is None else f"{score:.4f}", "judge": judge_word,
            "review": "yes" if reasons else "no", "reason": "; ".join(reasons)}


def _write(item: Loaded, mask: np.ndarray, target: Path, overlays: Path | None) -> None:
    if is_nifti(item.path):
        import nibabel as nib

        source = nib.load(str(item.path))
        data = mask.T.reshape(source.shape)  # (H, W) = (y, x) back to the input's (x, y[, 1])
        header = source.header.copy()
        header.set_data_dtype(np.uint8)
        image = type(source)(data.astype(np.uint8), source.affine, header)
        image.header.set_slope_inter(1, 0)
        nib.save(image, str(target))
    else:
        from PIL import Image

        Image.fromarray(mask * np.uint8(255)).save(target)
    if overlays is not None:
        _overlay(item, mask, overlays / f"{image_stem(item.path)}.png")


def _overlay(item: Loaded, mask: np.ndarray, target: Path) -> None:
    """The image (8-bit, its own size) with the mask's outline in green."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    a = item.original.astype(np.float32)
    a = a if a.ndim == 3 else a[..., None]
    a = a[..., :3] if a.shape[2] >= 3 else np.repeat(a[..., :1], 3, axis=2)
    lo, hi = np.percentile(a, [1, 99])
    rgb = (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    m = mask.astype(bool)
    rgb[m & ~binary_erosion(m, np.ones((3, 3), bool))] = (40, 230, 60)
    Image.fromarray(rgb).save(target)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def cmd_predict(args) -> int:
    judge = args.judge
    if judge is None and args.site is not None:
        from shared.config import load_site

        judge = load_site(args.site).work_dir
    options = Options(review_below=args.review_below, max_fraction=args.max_fraction, batch_size=args.batch_size,
                      overlays=args.overlays, force=args.force)
    return predict(args.model, args.images, args.out, judge, options, args.device)
