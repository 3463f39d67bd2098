"""`fl-client check --site FILE`, run as the installed console script a hospital runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _script(name: str) -> list[str]:
    """The installed console script beside this interpreter (a venv's bin/), else on PATH."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} is not installed (pip install -e .)")
    return [found]


def _run(*args: str, script: str = "fl-client") -> subprocess.CompletedProcess:
    return subprocess.run([*_script(script), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _noise(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _blob(h: int = 20, w: int = 24) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[5:15, 8:16] = 255
    return mask


@pytest.mark.parametrize("site", ["montgomery", "shenzhen_a", "shenzhen_b"])
def test_check_passes_on_the_demo_sites(site):
    result = _run("check", "--site", f"sites/demo/{site}.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"sites/demo/{site}.yaml: site '{site}' is ready (0 warning(s))"


def test_check_lists_every_problem_with_file_and_reason(tmp_path):
    root = tmp_path / "hospital"
    for split in ("labeled", "unlabeled", "test"):
        for i in range(3):
            _png(root / split / "images" / f"ok{i}.png", _noise(seed=i))
            if split != "unlabeled":
                _png(root / split / "masks" / f"ok{i}.png", _blob())
    (root / "labeled" / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _png(root / "labeled" / "masks" / "corrupt.png", _blob())
    _png(root / "labeled" / "images" / "small.png", _noise())
    _png(root / "labeled" / "masks" / "small.png", _blob(10, 12))  # not the size of its image
    gray = _blob()
    gray[0, 0] = 128  # three values: 0, 128, 255
    _png(root / "test" / "images" / "gray.png", _noise())
    _png(root / "test" / "masks" / "gray.png", gray)
    _png(root / "test" / "images" / "orphan.png", _noise())  # no mask
    (root / "calibration" / "images").mkdir(parents=True)  # empty folders
    (root / "calibration" / "masks").mkdir(parents=True)
    site = tmp_path / "broken.yaml"
    site.write_text(
        "name: broken\nwork_dir: work\nimage_size: 16\ndata:\n"
        + "".join(f"  {s}: {{images: hospital/{s}/images, masks: hospital/{s}/masks}}\n" for s in ("labeled", "calibration", "test"))
        + "  unlabeled: {images: hospital/unlabeled/images}\n"
    )

    result = _run("check", "--site", str(site))

    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    expected = [
        f"error: {root}/calibration/images: no images in this folder (expected .nii.gz, .png, .jpg, .jpeg, .nii files)",
        f"error: {root}/calibration/masks: no masks in this folder (expected .nii.gz, .png, .jpg, .jpeg, .nii files)",
        f"error: {root}/labeled/images/corrupt.png: cannot read: ",
        f"error: {root}/labeled/masks/small.png: mask is 12x10 (WxH) but its image small.png is 24x20; a pair must have the same size",
        f"error: {root}/test/images/orphan.png: image without mask: no orphan.* in the masks folder",
        f"error: {root}/test/masks/gray.png: mask is not binary: values 0, 128, 255 (expected 0 and one positive value",
    ]
    for fragment in expected:  # each problem on a line of its own
        assert sum(line.startswith(fragment) for line in lines) == 1, (fragment, lines)
    assert len([line for line in lines if line.startswith("error: ")]) == len(expected)
    assert lines[-1].startswith(f"{site}: 6 problem(s) found")
    assert "ok0.png" not in result.stdout and "Traceback" not in result.stderr


def test_malformed_yaml_exits_2_with_one_line_naming_file_and_key(tmp_path):
    site = tmp_path / "typo.yaml"
    site.write_text("name: typo\nwork_dir: work\njudge: {kind: agrement}\ndata: {}\n")
    result = _run("check", "--site", str(site))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"fl-client: {site}: judge.kind: 'agrement' is not one of agreement, uncertainty, learned, federated, oracle"
    ]


def test_missing_site_file_exits_2(tmp_path):
    result = _run("check", "--site", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"fl-client: {tmp_path / 'nope.yaml'}: cannot read: No such file or directory"]


@pytest.mark.parametrize("script", ["fl-client", "fl-server", "fl-sim"])
def test_help_exits_0(script):
    result = _run("--help", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")
