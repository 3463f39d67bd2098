"""fl-server export (a MONAI bundle) and fl-client predict (issue 13, items 2 and 3), on a tiny
run dir: a 32 px UNet checkpoint and its config.yaml, a handful of PNG, JPEG and NIfTI images."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fl_client.cli import main as client_main
from fl_server.cli import main as server_main
from shared.config import ModelConfig
from shared.judges.learned import LearnedJudge
from shared.site import model_from_config

MODEL = ModelConfig(name="unet", channels=(8, 16), strides=(2,), num_res_units=1, dropout=0.1)
AFFINE = np.array([[0.7, 0, 0, -12.0], [0, 0.9, 0, 30.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text(textwrap.dedent(f"""\
        name: tiny
        run_dir: {run}
        model: {{name: unet, in_channels: 1, channels: [8, 16], strides: [2], num_res_units: 1, dropout: 0.1}}

        # sites, as resolved
        ---
        name: a
        image_size: 32
        channels: 1
        work_dir: {run / 'work'}
        """))
    for number in (1, 2):
        torch.manual_seed(number)
        state = model_from_config(MODEL).state_dict()
        torch.save({"round": number, "state_dict": state, "ledger": {}, "config_hash": "x"},
                   run / "checkpoints" / f"round_{number:03d}.pt")
    lines = [{"kind": "site", "round": 2, "site": "a", "eval": {"dice": 0.8, "n_images": 10.0}, "train": {}},
             {"kind": "global", "round": 2, "mean_dice": 0.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """A bright disc on a noisy background, so that masks are neither empty nor full."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2) * 150.0
    return np.clip(disc + rng.normal(60, 20, (h, w)), 0, 255)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(_picture(40, 52, 0).astype(np.uint8)).save(folder / "gray.png")
    rgb = np.stack([_picture(45, 37, s) for s in (1, 2, 3)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "colour.jpg", quality=95)
    nib.save(nib.Nifti1Image(_picture(36, 44, 4).T.astype(np.float32), AFFINE), folder / "scan.nii.gz")
    return folder


def _predict(*args) -> int:
    return client_main(["predict", *map(str, args)])


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return {row["image"]: row for row in csv.DictReader(fh)}


def test_predict_png_jpg_nifti_original_size_format_and_affine(run_dir, images, tmp_path):
    out = tmp_path / "preds"
    assert _predict("--model", run_dir, "--images", images, "--out", out, "--overlays") == 0
    assert Image.open(out / "gray.png").size == (52, 40)
    assert Image.open(out / "colour.png").size == (37, 45)
    assert set(np.unique(np.asarray(Image.open(out / "gray.png")))) <= {0, 255}
    scan = nib.load(out / "scan.nii.gz")
    assert scan.shape == (44, 36) and np.allclose(scan.affine, AFFINE)
    assert set(np.unique(np.asarray(scan.dataobj))) <= {0, 1}
    rows = _rows(out)
    assert set(rows) == {"gray.png", "colour.jpg", "scan.nii.gz"}
    assert rows["scan.nii.gz"]["mask"] == "scan.nii.gz" and (rows["scan.nii.gz"]["height"], rows["scan.nii.gz"]["width"]) == ("36", "44")
    assert int(rows["gray.png"]["foreground_pixels"]) == int((np.asarray(Image.open(out / "gray.png")) > 0).sum())
    assert all(r["predicted_dice"] == "" and r["judge"].startswith("none") for r in rows.values())
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["colour.png", "gray.png", "scan.png"]


def test_predict_skips_and_lists_a_corrupt_file(run_dir, images, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "gray.png").write_bytes((images / "gray.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    assert _predict("--model", run_dir / "checkpoints" / "round_001.pt", "--images", folder, "--out", out) == 1
    printed = capsys.readouterr().out
    assert f"error: {folder / 'broken.png'}: cannot read" in printed and "1 file(s) skipped" in printed
    assert set(_rows(out)) == {"gray.png"} and not (out / "broken.png").exists()


def test_predict_never_overwrites(run_dir, images, tmp_path, capsys):
    assert _predict("--model", run_dir, "--images", images, "--out", images) == 2
    assert _predict("--model", run_dir, "--images", images, "--out", images / "sub") == 2
    out = tmp_path / "p"
    assert _predict("--model", run_dir, "--images", images, "--out", out) == 0
    assert _predict("--model", run_dir, "--images", images, "--out", out) == 2
    assert "already exists" in capsys.readouterr().err
    assert _predict("--model", run_dir, "--images", images, "--out", out, "--force") == 0


def test_predict_with_the_learned_judge_flags_for_review(run_dir, images, tmp_path):
    work = tmp_path / "work"
    LearnedJudge(1, 32).save(work)
    out = tmp_path / "p"
    assert _predict("--model", run_dir, "--images", images, "--out", out, "--judge", work, "--review-below", "1.01") == 0
    rows = _rows(out)
    assert all(0 <= float(r["predicted_dice"]) <= 1 and r["review"] == "yes" for r in rows.values())
    assert all(r["judge"].startswith("learned") for r in rows.values())


def test_export_best_without_best_pt_is_one_line(run_dir, tmp_path, capsys):
    assert server_main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--round", "best"]) == 2
    assert "no best.pt in RUN_DIR" in capsys.readouterr().err
    assert server_main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--round", "7"]) == 2


def _monai_run(bundle: Path, images: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(images), "--output_dir", str(out),
           "--device", "$torch.device('cpu')", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_exported_bundle_through_monais_runner_gives_predicts_masks_bit_for_bit(run_dir, images, tmp_path):
    bundle = tmp_path / "bundle"
    assert server_main(["export", str(run_dir), "--out", str(bundle)]) == 0
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts", "docs/README.md"):
        assert (bundle / part).is_file(), part
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())["fedrndpo"]
    assert (meta["round"], meta["image_size"], meta["consortium"]) == (2, 32, "tiny")
    assert meta["sites"]["a"]["test_dice"] == 0.8
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    assert scripted(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)

    _runner_matches_predict(bundle, images, tmp_path)


def _runner_matches_predict(bundle: Path, images: Path, tmp_path: Path) -> None:
    """MONAI's runner on the bundle writes fl-client predict's masks, bit for bit: PNG, JPEG, a
    constant (blank) PNG, and NIfTI with its affine."""
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for name in ("gray.png", "colour.jpg"):
        (pngs / name).write_bytes((images / name).read_bytes())
    Image.fromarray(np.full((30, 41), 77, np.uint8)).save(pngs / "blank.png")  # preprocessing gives zeros
    preds = tmp_path / "preds"
    assert _predict("--model", bundle, "--images", pngs, "--out", preds) == 0
    _monai_run(bundle, pngs, tmp_path / "monai_png")
    for name in ("gray.png", "colour.png", "blank.png"):
        ours, theirs = (np.asarray(Image.open(d / name)) for d in (preds, tmp_path / "monai_png"))
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), name
        if name != "blank.png":
            assert 0 < (ours > 0).mean() < 1, f"{name}: a trivial mask proves nothing"
    assert np.asarray(Image.open(preds / "blank.png")).shape == (30, 41)
    niftis = tmp_path / "niftis"
    niftis.mkdir()
    (niftis / "scan.nii.gz").write_bytes((images / "scan.nii.gz").read_bytes())
    nii_preds = tmp_path / "nii_preds"
    assert _predict("--model", bundle, "--images", niftis, "--out", nii_preds) == 0
    _monai_run(bundle, niftis, tmp_path / "monai_nii", "--output_ext", ".nii.gz")
    ours, theirs = nib.load(nii_preds / "scan.nii.gz"), nib.load(tmp_path / "monai_nii" / "scan.nii.gz")
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj).reshape(ours.shape))
    assert np.allclose(ours.affine, theirs.affine)


def _tiny_run(run: Path, model_yaml: str, model: ModelConfig) -> Path:
    """A run dir at 32 px: config.yaml with `model_yaml`, rounds 1 and 2 of `model`."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: tiny\nrun_dir: {run}\nmodel: {model_yaml}\n---\n"
                                     f"name: a\nimage_size: 32\nchannels: 1\nwork_dir: {run / 'work'}\n")
    for number in (1, 2):
        torch.manual_seed(number)
        torch.save({"round": number, "state_dict": model_from_config(model).state_dict()},
                   run / "checkpoints" / f"round_{number:03d}.pt")
    return run


def test_a_segresnet_exports_and_monais_runner_gives_predicts_masks(images, tmp_path):
    """Every trainable network exports (the bundle's network_def is shared.networks')."""
    args = {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}
    run = _tiny_run(tmp_path / "run", "{name: segresnet, in_channels: 1, dropout: 0.1, args: "
                                      "{init_filters: 8, blocks_down: [1, 1], blocks_up: [1]}}",
                    ModelConfig(name="segresnet", dropout=0.1, args=args))
    bundle = tmp_path / "bundle"
    assert server_main(["export", str(run), "--out", str(bundle)]) == 0
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"] == {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 2,
                                        "in_channels": 1, "out_channels": 1, "dropout_prob": 0.1, **args}
    _runner_matches_predict(bundle, images, tmp_path)


@pytest.mark.parametrize("name, yaml_model, model", [
    ("attention_unet", "{name: attention_unet, in_channels: 1, channels: [4, 8], strides: [2]}",
     ModelConfig(name="attention_unet", channels=(4, 8), strides=(2,))),
    ("flexible_unet", "{name: flexible_unet, in_channels: 1, args: {backbone: resnet10}}",
     ModelConfig(name="flexible_unet", args={"backbone": "resnet10"})),
])
def test_every_network_exports_weights_that_load_into_its_network_def(name, yaml_model, model, tmp_path):
    from monai.bundle import ConfigParser

    run = _tiny_run(tmp_path / "run", yaml_model, model)
    assert server_main(["export", str(run), "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "configs" / "inference.json").read_text())
    net = ConfigParser({"net": config["network_def"]}).get_parsed_content("net")
    net.load_state_dict(torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True))


def test_a_failed_export_writes_nothing_and_names_the_config(run_dir, tmp_path, capsys, monkeypatch):
    from shared import bundle

    def refuse(spec):
        raise ValueError("cannot be built")

    monkeypatch.setattr(bundle, "network_def", refuse)
    out = tmp_path / "b"
    assert server_main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fl-server: {run_dir / 'config.yaml'}: model: unet") and "cannot be built" in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no bundle, no staging folder


def test_export_and_predict_default_to_best_pt_and_say_so(run_dir, images, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copy(run / "checkpoints" / "round_001.pt", run / "best.pt")  # round 2 was rolled back
    assert server_main(["export", str(run), "--out", str(tmp_path / "b")]) == 0
    assert "best.pt (the best round on calibration Dice)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())["fedrndpo"]
    assert (meta["round"], meta["checkpoint"]) == (1, "best.pt")
    assert _predict("--model", run, "--images", images, "--out", tmp_path / "p") == 0
    assert f"{run / 'best.pt'} (the best round on calibration Dice)" in capsys.readouterr().out
    assert _predict("--model", run_dir, "--images", images, "--out", tmp_path / "q") == 0
    assert "round_002.pt (the last round: the run has no best.pt)" in capsys.readouterr().out


def test_consortium_figures_read_the_sites_calibration_dice(tmp_path):
    from fl_server.export import _readme, consortium_figures

    lines = [{"kind": "site", "round": 1, "site": "a", "eval": {"dice": 0.5, "n_images": 10.0, "calib_dice": 0.4, "calib_images": 5.0}},
             {"kind": "global", "round": 1, "mean_dice": 0.5, "calib_dice": 0.4, "calib_images": 5.0,
              "best_round": 1, "best_calib_dice": 0.4},
             {"kind": "site", "round": 2, "site": "a", "eval": {"dice": 0.8, "n_images": 10.0, "calib_dice": 0.7, "calib_images": 5.0},
              "train": {"rel_dice_identity": 0.1}},
             {"kind": "site", "round": 2, "site": "b", "eval": {"dice": 0.6, "n_images": 4.0}},
             {"kind": "global", "round": 2, "mean_dice": 0.74, "calib_dice": 0.7, "calib_images": 5.0,
              "best_round": 2, "best_calib_dice": 0.7},
             {"kind": "global", "round": 3, "mean_dice": 0.6, "calib_dice": 0.5, "calib_images": 5.0,
              "best_round": 2, "best_calib_dice": 0.7, "rolled_back": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = consortium_figures(tmp_path, 2)
    assert figures["sites"] == {
        "a": {"test_dice": 0.8, "test_images": 10, "calibration_dice": 0.7, "calibration_images": 5},
        "b": {"test_dice": 0.6, "test_images": 4, "calibration_dice": None, "calibration_images": None}}
    assert isinstance(figures["sites"]["a"]["test_images"], int)
    assert (figures["rounds_completed"], figures["mean_test_dice"], figures["calibration_dice"]) == (3, 0.74, 0.7)
    assert (figures["best_round"], figures["best_calib_dice"]) == (2, 0.7)
    meta = {"name": "t", "description": "d",
            "fedrndpo": {"channels": 1, "image_size": 32, "round": 2, **figures}}
    text = _readme(meta)
    assert "| a | 0.800 | 10 | 0.700 | 5 |" in text and "| b | 0.600 | 4 |  |  |" in text
    assert "best round 2" in text


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_predict_batch_size_must_be_positive(run_dir, images, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        _predict("--model", run_dir, "--images", images, "--out", tmp_path / "p", "--batch-size", value)
    assert stop.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_predict_cuda_without_cuda_is_one_line(run_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _predict("--model", run_dir, "--images", images, "--out", tmp_path / "p", "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fl-client: --device: 'cuda' but this machine has no usable CUDA GPU; "
                   "use auto (CUDA when present, else CPU) or cpu")
    assert not (tmp_path / "p").exists()
