"""`fl-server export RUN_DIR --out DIR [--round N|best]`: a run's model as a MONAI bundle.

A hospital gets a format the medical imaging world runs (`python -m monai.bundle run`), with
what it needs to trust it: the network, the input it expects, and the consortium's aggregate
figures (never a per-image number). The bundle layout lives in `shared.bundle`, so that
`fl-client predict` reads what this writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from shared import bundle
from shared.config import ConfigError
from shared.inference import InferenceSpec, preprocessing_description, run_config, spec_from_run_dir
from shared.model import load_state
from shared.site import model_from_config

BEST = "best.pt"


def choose_checkpoint(run_dir: Path, which: str | None) -> tuple[Path, int | None]:
    """The checkpoint file to export: round N, `best` (RUN_DIR/best.pt) or the last round."""
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    if which == "best":
        path = run_dir / BEST
        if not path.is_file():
            raise ConfigError(f"{run_dir}: no {BEST} in RUN_DIR (a run that chose no best round); export a round with --round N")
        return path, None
    if which is None:
        if not checkpoints:
            raise ConfigError(f"{run_dir}: no checkpoints/round_NNN.pt: the run has not completed a round")
        return checkpoints[-1], int(checkpoints[-1].stem.split("_")[1])
    try:
        number = int(which)
    except ValueError:
        raise ConfigError(f"--round: {which!r} is not a round number or 'best'") from None
    path = run_dir / "checkpoints" / f"round_{number:03d}.pt"
    if not path.is_file():
        have = ", ".join(str(int(p.stem.split('_')[1])) for p in checkpoints) or "none"
        raise ConfigError(f"{path}: no checkpoint for round {number} (rounds saved: {have})")
    return path, number


def consortium_figures(run_dir: Path, round_number: int | None) -> dict:
    """Aggregates from metrics.jsonl for the exported round: each site's test Dice (its test split)
    and calibration Dice (measured by the sites on the model when it arrived next round, or by
    the server's federated evaluation where the run records one), with image counts."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    rounds = sorted({int(r["round"]) for r in records if "round" in r})
    sites: dict[str, dict] = {}
    for r in records:
        if r.get("kind") != "site" or round_number is None:
            continue
        entry = sites.setdefault(r["site"], {"test_dice": None, "test_images": None, "calibration_dice": None})
        evaluation, train = r.get("eval") or {}, r.get("train") or {}
        if r.get("round") == round_number:
            if "dice" in evaluation:
                entry["test_dice"], entry["test_images"] = evaluation["dice"], evaluation.get("n_images")
            for key in ("calibration_dice", "cal_dice"):
                if key in evaluation:
                    entry["calibration_dice"] = evaluation[key]
        if r.get("round") == round_number + 1 and entry["calibration_dice"] is None and "rel_dice_identity" in train:
            entry["calibration_dice"] = train["rel_dice_identity"]
    overall = next((r for r in records if r.get("kind") == "global" and r.get("round") == round_number), {})
    return {"rounds_completed": max(rounds) if rounds else None, "sites": sites,
            "mean_test_dice": overall.get("mean_dice")}


def export(run_dir: Path, out: Path, which: str | None = None, force: bool = False) -> Path:
    """Write the bundle; returns its folder. ConfigError (one line) for a bad run dir or round."""
    run_dir, out = Path(run_dir), Path(out)
    spec = spec_from_run_dir(run_dir)
    checkpoint, number = choose_checkpoint(run_dir, which)
    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{checkpoint}: cannot read: {type(exc).__name__}: {exc}") from None
    if number is None and isinstance(payload, dict) and "round" in payload:
        number = int(payload["round"])
    targets = [out / p for p in (bundle.METADATA, bundle.INFERENCE, bundle.WEIGHTS, bundle.TORCHSCRIPT, bundle.README)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]}: already exists; choose another --out or pass --force to replace the bundle")
    model = model_from_config(spec.model)
    try:
        model.load_state_dict(load_state(checkpoint))
    except RuntimeError as exc:
        raise ConfigError(f"{checkpoint}: does not fit the run's model ({str(exc).splitlines()[0]})") from None
    model.eval()
    for p in targets:
        p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / bundle.WEIGHTS)
    metadata = _metadata(spec, run_dir, checkpoint, number)
    _torchscript(model, spec, out / bundle.TORCHSCRIPT, metadata)
    (out / bundle.METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    (out / bundle.INFERENCE).write_text(json.dumps(bundle.inference_config(spec), indent=2) + "\n", encoding="utf-8")
    (out / bundle.README).write_text(_readme(metadata), encoding="utf-8")
    return out


def _metadata(spec: InferenceSpec, run_dir: Path, checkpoint: Path, number: int | None) -> dict:
    import monai
    import numpy

    consortium, _ = run_config(run_dir)
    figures = consortium_figures(run_dir, number)
    s, c = spec.image_size, spec.channels
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from {run_dir.name}, round {number}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "pillow": _version("PIL")},
        "name": f"{consortium.get('name', run_dir.name)} segmentation",
        "task": "2-D binary segmentation",
        "description": f"Federated model of consortium {consortium.get('name')!r}, round {number} ({checkpoint.name}).",
        "authors": f"consortium {consortium.get('name')!r}",
        "copyright": "the consortium's members",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "any 2-D image",
                                 "num_channels": c, "spatial_shape": [s, s], "dtype": "float32",
                                 "value_range": [], "is_patch_data": False,
                                 "channel_def": {str(i): "image" for i in range(c)}}},
            "outputs": {"pred": {"type": "image", "format": "logits", "num_channels": 1, "spatial_shape": [s, s],
                                 "dtype": "float32", "value_range": [], "is_patch_data": False,
                                 "channel_def": {"0": "foreground logit (> 0: foreground)"}}},
        },
        bundle.SECTION: {
            **spec.to_dict(),
            "preprocessing": preprocessing_description(spec),
            "consortium": consortium.get("name"),
            "round": number,
            "checkpoint": checkpoint.name,
            **figures,
        },
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def _torchscript(model, spec: InferenceSpec, path: Path, metadata: dict) -> None:
    """Script the network (trace where scripting fails); it must give the state dict's output."""
    import warnings

    example = torch.randn(2, spec.channels, spec.image_size, spec.image_size)
    with warnings.catch_warnings():  # torch 2.x deprecates TorchScript; MONAI bundles still ship model.ts
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception:
            scripted = torch.jit.trace(model, example)
        with torch.no_grad():
            if not torch.allclose(scripted(example), model(example), atol=1e-5):
                raise RuntimeError(f"{path}: the TorchScript model does not reproduce the network's output")
        torch.jit.save(scripted, str(path), _extra_files={"metadata.json": json.dumps(metadata)})


def _readme(meta: dict) -> str:
    ours = meta[bundle.SECTION]
    lines = [f"# {meta['name']}", "", meta["description"], "",
             f"Input: {ours['channels']}-channel 2-D images (PNG, JPEG or NIfTI), resized to "
             f"{ours['image_size']} x {ours['image_size']} and normalised per image as in training "
             "(configs/metadata.json, `fedrndpo.preprocessing`). Output: one binary mask per image, at the "
             "image's own size.", "",
             "Run it with MONAI's own runner (from this folder):", "",
             "    python -m monai.bundle run --config_file configs/inference.json \\",
             "        --dataset_dir /path/to/images --output_dir /path/to/masks",
             "",
             "Every mask is written with `output_ext` (default .png; `--output_ext .nii.gz` for NIfTI input, "
             "which keeps the input's affine). Or, at a site of the consortium, "
             "`fl-client predict --model . --images DIR --out DIR` (original format and size per file, a CSV "
             "with areas and the learned judge's predicted Dice).", "",
             "Consortium figures (aggregates per site, Dice of the exported round):", "",
             "| site | test Dice | test images | calibration Dice |", "|---|---|---|---|"]
    for name, figures in ours["sites"].items():
        fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"| {name} | {fmt(figures['test_dice'])} | {fmt(figures['test_images'])} | {fmt(figures['calibration_dice'])} |")
    return "\n".join(lines) + "\n"


def cmd_export(args) -> int:
    try:
        out = export(args.run_dir, args.out, args.round, args.force)
    except ConfigError as exc:
        print(f"fl-server: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: MONAI bundle written (python -m monai.bundle run --config_file {out / bundle.INFERENCE} "
          f"--bundle_root {out} --dataset_dir IMAGES --output_dir MASKS)")
    return 0
