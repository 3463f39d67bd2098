"""`fl-server export RUN_DIR --out DIR [--round N|best]`: a run's model as a MONAI bundle.

A hospital gets a format the medical imaging world runs (`python -m monai.bundle run`), with
what it needs to trust it: the network, the input it expects, and the consortium's aggregate
figures (never a per-image number). The bundle layout lives in `shared.bundle`, so that
`fl-client predict` reads what this writes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from shared import bundle
from shared.config import ConfigError
from shared.inference import (BEST, InferenceSpec, default_checkpoint, preprocessing_description, run_config,
                              spec_from_run_dir)
from shared.model import load_state
from shared.site import model_from_config


def choose_checkpoint(run_dir: Path, which: str | None) -> tuple[Path, int | None, str]:
    """(checkpoint, round, why): round N, `best` (RUN_DIR/best.pt), or by default best.pt when the
    run has one, else the last round (which model selection may have rolled back)."""
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    if which == "best":
        path = run_dir / BEST
        if not path.is_file():
            raise ConfigError(f"{run_dir}: no {BEST} in RUN_DIR (a run that chose no best round); export a round with --round N")
        return path, None, "--round best"
    if which is None:
        path, why = default_checkpoint(run_dir)
        return path, None if path.name == BEST else int(path.stem.split("_")[1]), why
    try:
        number = int(which)
    except ValueError:
        raise ConfigError(f"--round: {which!r} is not a round number or 'best'") from None
    path = run_dir / "checkpoints" / f"round_{number:03d}.pt"
    if not path.is_file():
        have = ", ".join(str(int(p.stem.split('_')[1])) for p in checkpoints) or "none"
        raise ConfigError(f"{path}: no checkpoint for round {number} (rounds saved: {have})")
    return path, number, f"--round {number}"


def consortium_figures(run_dir: Path, round_number: int | None) -> dict:
    """Aggregates from metrics.jsonl for the exported round: each site's test and calibration Dice
    with image counts (the `eval` of its site line: dice / n_images, calib_dice / calib_images,
    measured on that round's global model), the consortium's calibration Dice of the round and
    model selection's best round so far (the global lines: calib_dice, best_round, best_calib_dice)."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    records = [r for r in records if isinstance(r, dict)]
    rounds = sorted({int(r["round"]) for r in records if "round" in r})
    count = lambda v: None if v is None else int(v)  # noqa: E731 - metrics.jsonl stores counts as floats
    sites: dict[str, dict] = {}
    for r in records:
        if r.get("kind") != "site" or round_number is None or r.get("round") != round_number:
            continue
        evaluation = r.get("eval") or {}
        sites[r["site"]] = {"test_dice": evaluation.get("dice"), "test_images": count(evaluation.get("n_images")),
                            "calibration_dice": evaluation.get("calib_dice"),
                            "calibration_images": count(evaluation.get("calib_images"))}
    overall = next((r for r in records if r.get("kind") == "global" and r.get("round") == round_number), {})
    latest = next((r for r in reversed(records) if r.get("kind") == "global"), {})
    return {"rounds_completed": max(rounds) if rounds else None, "sites": sites,
            "mean_test_dice": overall.get("mean_dice"), "calibration_dice": overall.get("calib_dice"),
            "calibration_images": count(overall.get("calib_images")),
            "best_round": latest.get("best_round"), "best_calib_dice": latest.get("best_calib_dice")}


def export(run_dir: Path, out: Path, which: str | None = None, force: bool = False) -> tuple[Path, Path, str]:
    """Write the bundle; returns (its folder, the checkpoint, why that one). ConfigError (one line) for
    a bad run dir, round or network. Everything is computed first and written into a temporary folder
    beside --out, moved in at the end: a failure leaves no half-written bundle."""
    run_dir, out = Path(run_dir), Path(out)
    config = run_dir / "config.yaml"
    spec = spec_from_run_dir(run_dir)
    checkpoint, number, why = choose_checkpoint(run_dir, which)
    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{checkpoint}: cannot read: {type(exc).__name__}: {exc}") from None
    if number is None and isinstance(payload, dict) and "round" in payload:
        number = int(payload["round"])
    names = (bundle.METADATA, bundle.INFERENCE, bundle.WEIGHTS, bundle.TORCHSCRIPT, bundle.README)
    existing = [out / p for p in names if (out / p).exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]}: already exists; choose another --out or pass --force to replace the bundle")
    try:
        inference = bundle.inference_config(spec)
        model = model_from_config(spec.model)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config}: model: {spec.model.name} cannot be exported as a MONAI bundle: {exc}") from None
    try:
        model.load_state_dict(load_state(checkpoint))
    except RuntimeError as exc:
        raise ConfigError(f"{checkpoint}: does not fit the run's model ({str(exc).splitlines()[0]})") from None
    model.eval()
    metadata = _metadata(spec, run_dir, checkpoint, number)
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    files = {bundle.WEIGHTS: weights.getvalue(),
             bundle.TORCHSCRIPT: _torchscript(model, spec, config, metadata),
             bundle.METADATA: (json.dumps(metadata, indent=2) + "\n").encode("utf-8"),
             bundle.INFERENCE: (json.dumps(inference, indent=2) + "\n").encode("utf-8"),
             bundle.README: _readme(metadata).encode("utf-8")}
    _write_bundle(out, files)
    return out, checkpoint, why


def _write_bundle(out: Path, files: dict[Path, bytes]) -> None:
    """Write `files` into a temporary folder beside `out`, then move each into `out` (os.replace)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as exc:
        raise ConfigError(f"{out.parent}: cannot write the bundle there ({exc.strerror or exc})") from None
    try:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the bundle ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _torchscript(model, spec: InferenceSpec, config: Path, metadata: dict) -> bytes:
    """Script the network (trace where scripting fails); it must give the state dict's output."""
    import warnings

    example = torch.randn(2, spec.channels, spec.image_size, spec.image_size)
    with warnings.catch_warnings():  # torch 2.x deprecates TorchScript; MONAI bundles still ship model.ts
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
        except Exception:
            try:
                scripted = torch.jit.trace(model, example)
            except Exception as exc:  # noqa: BLE001 - one line naming the network, not a tracer traceback
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ConfigError(f"{config}: model: {spec.model.name} cannot be converted to TorchScript "
                                  f"({first})") from None
        with torch.no_grad():
            if not torch.allclose(scripted(example), model(example), atol=1e-5):
                raise ConfigError(f"{config}: model: {spec.model.name}'s TorchScript does not reproduce the "
                                  "network's output, so no bundle is written")
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
    return buffer.getvalue()


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
             "| site | test Dice | test images | calibration Dice | calibration images |", "|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for name, figures in ours["sites"].items():
        lines.append(f"| {name} | {fmt(figures['test_dice'])} | {fmt(figures['test_images'])} | "
                     f"{fmt(figures['calibration_dice'])} | {fmt(figures['calibration_images'])} |")
    if ours.get("best_round") is not None:
        lines += ["", f"Model selection: best round {ours['best_round']} (consortium calibration Dice "
                      f"{fmt(ours.get('best_calib_dice'))}); this bundle is round {ours['round']}."]
    return "\n".join(lines) + "\n"


def cmd_export(args) -> int:
    try:
        out, checkpoint, why = export(args.run_dir, args.out, args.round, args.force)
    except ConfigError as exc:
        print(f"fl-server: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: MONAI bundle of {checkpoint} ({why}) written (python -m monai.bundle run --config_file {out / bundle.INFERENCE} "
          f"--bundle_root {out} --dataset_dir IMAGES --output_dir MASKS)")
    return 0
