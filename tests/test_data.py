"""shared/data.py: reading, pairing, checking and splitting a site's images and masks."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from shared.config import SPLITS, ConfigError, Groups, SplitFractions, load_site
from shared.data import (
    BadFile,
    Problem,
    check_site_data,
    group_keys,
    load_site_data,
    read_image,
    read_mask,
    split_names,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "lung_cxr"
SIZE = 16


# ----------------------------------------------------------------------------- helpers


def _noise(h: int, w: int, seed: int = 0, channels: int | None = None) -> np.ndarray:
    shape = (h, w) if channels is None else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _blob(h: int, w: int, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = value
    return mask


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _nifti(path: Path, array_hw: np.ndarray) -> Path:
    """NIfTI arrays are (x, y): a (H, W) picture is stored transposed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_hw.T), np.eye(4)), str(path))
    return path


def _pairs(folder: Path, stems, h: int = 20, w: int = 24) -> None:
    for i, stem in enumerate(stems):
        _png(folder / "images" / f"{stem}.png", _noise(h, w, seed=i))
        _png(folder / "masks" / f"{stem}.png", _blob(h, w))


def _site(tmp_path: Path, data: dict, **extra):
    path = tmp_path / "site.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "test", "work_dir": "work", "image_size": SIZE, "data": data, **extra}))
    return load_site(path)


def _folder(root: Path, masks: bool = True) -> dict:
    return {"images": str(root / "images"), **({"masks": str(root / "masks")} if masks else {})}


def _explicit(root: Path, unlabeled_masks: bool = False) -> dict:
    return {s: _folder(root / s, masks=s != "unlabeled" or unlabeled_masks) for s in SPLITS}


# ----------------------------------------------------------------------------- one image


@pytest.mark.parametrize(
    "array, channels",
    [
        (_noise(20, 30), 1),  # gray -> 1
        (_noise(20, 30), 3),  # gray -> repeated to 3
        (_noise(20, 30, channels=3), 1),  # RGB -> luminance
        (_noise(20, 30, channels=3), 3),  # RGB -> RGB
        (_noise(8, 8), 1),  # upsampled
    ],
)
def test_read_image_shape_dtype_and_normalisation(tmp_path, array, channels):
    x = read_image(_png(tmp_path / "a.png", array), SIZE, channels)
    assert x.shape == (channels, SIZE, SIZE) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-5
    assert float(x.std(correction=0)) == pytest.approx(1.0, abs=1e-4)


def test_gray_repeated_to_three_channels_and_rgb_of_gray_equals_gray(tmp_path):
    gray = _noise(20, 30)
    x1 = read_image(_png(tmp_path / "g.png", gray), SIZE, 1)
    x3 = read_image(tmp_path / "g.png", SIZE, 3)
    assert torch.equal(x3[0], x3[1]) and torch.equal(x3[0], x3[2])
    torch.testing.assert_close(x3[:1], x1)
    rgb_of_gray = read_image(_png(tmp_path / "c.png", np.repeat(gray[..., None], 3, axis=2)), SIZE, 1)
    torch.testing.assert_close(rgb_of_gray, x1, atol=1e-4, rtol=0)


def test_rgb_to_one_channel_is_luminance(tmp_path):
    # pure red, green, blue thirds: luminance 0.299, 0.587, 0.114 of 255 (before normalisation)
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[:, :5, 0], rgb[:, 5:10, 1], rgb[:, 10:, 2] = 255, 255, 255
    x = read_image(_png(tmp_path / "rgb.png", rgb), SIZE, 1)[0]
    lum = np.zeros((SIZE, SIZE), np.float32)
    lum[:, :5], lum[:, 5:10], lum[:, 10:] = 0.299 * 255, 0.587 * 255, 0.114 * 255
    expected = (lum - lum.mean()) / lum.std()
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-4)


def test_constant_image_is_zeros_not_nan(tmp_path):
    x = read_image(_png(tmp_path / "flat.png", np.full((20, 20), 77, np.uint8)), SIZE, 3)
    assert torch.isfinite(x).all() and torch.count_nonzero(x) == 0


def test_nifti_reads_like_the_same_png(tmp_path):
    picture = _noise(SIZE, 24)
    from_png = read_image(_png(tmp_path / "a.png", picture), SIZE, 1)
    from_nifti = read_image(_nifti(tmp_path / "a.nii.gz", picture), SIZE, 1)
    torch.testing.assert_close(from_nifti, from_png, atol=1e-5, rtol=0)
    # a 3-D file with a singleton axis is a 2-D image; .nii (uncompressed) works too
    nib.save(nib.Nifti1Image(np.ascontiguousarray(picture.T)[..., None], np.eye(4)), str(tmp_path / "b.nii"))
    torch.testing.assert_close(read_image(tmp_path / "b.nii", SIZE, 1), from_png, atol=1e-5, rtol=0)


def test_nifti_volume_is_a_problem(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3), np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    with pytest.raises(BadFile, match=r"vol\.nii\.gz: is a 3-D volume of shape \(16, 16, 3\)"):
        read_image(tmp_path / "vol.nii.gz", SIZE, 1)


def test_jpeg_image_reads(tmp_path):
    Image.fromarray(_noise(20, 20, channels=3)).save(tmp_path / "a.jpg")
    assert read_image(tmp_path / "a.jpg", SIZE, 3).shape == (3, SIZE, SIZE)


def test_corrupt_image_is_bad_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadFile, match=r"bad\.png: cannot read") as info:
        read_image(tmp_path / "bad.png", SIZE, 1)
    assert isinstance(info.value, ValueError) and info.value.problem.file == tmp_path / "bad.png"


# ----------------------------------------------------------------------------- one mask


@pytest.mark.parametrize(
    "array, foreground",
    [
        (_blob(SIZE, SIZE, 1), _blob(SIZE, SIZE, 1)),  # {0, 1}
        (_blob(SIZE, SIZE, 255), _blob(SIZE, SIZE, 1)),  # {0, 255}
        (_blob(SIZE, SIZE, 7), _blob(SIZE, SIZE, 1)),  # {0, v}
        (np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8)),  # one value: empty
        (np.full((SIZE, SIZE), 255, np.uint8), np.ones((SIZE, SIZE), np.uint8)),  # one value: full
        (np.repeat(_blob(SIZE, SIZE)[..., None], 3, axis=2), _blob(SIZE, SIZE, 1)),  # RGB, equal channels
    ],
)
def test_binary_masks_read_as_zero_one(tmp_path, array, foreground):
    m = read_mask(_png(tmp_path / "m.png", array), SIZE)
    assert m.shape == (1, SIZE, SIZE) and m.dtype == torch.uint8
    np.testing.assert_array_equal(m[0].numpy(), foreground)


def test_mask_resize_stays_binary(tmp_path):
    rng = np.random.default_rng(1)
    noisy = (rng.random((37, 41)) > 0.5).astype(np.uint8) * 255
    for source in (_png(tmp_path / "m.png", noisy), _nifti(tmp_path / "m.nii.gz", noisy // 255)):
        m = read_mask(source, SIZE)
        assert m.shape == (1, SIZE, SIZE) and set(m.unique().tolist()) <= {0, 1}
    big = read_mask(_png(tmp_path / "blob.png", _blob(64, 64)), SIZE)  # nearest keeps the share
    assert float(big.float().mean()) == pytest.approx(float((_blob(64, 64) > 0).mean()), abs=0.05)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[0, 1], [2, 0]], np.uint8).repeat(8, 0).repeat(8, 1), r"mask is not binary: values 0, 1, 2 "),
        (np.array([[0, 128], [255, 0]], np.uint8).repeat(8, 0).repeat(8, 1), r"mask is not binary: values 0, 128, 255"),
        (np.array([[3, 9]], np.uint8).repeat(16, 0).repeat(8, 1), r"mask is not binary: values 3, 9 "),
        (np.arange(256, dtype=np.uint8).reshape(16, 16), r"values 0, 1, 2, 3, 4, 5, \.\.\. \(256 values\)"),
        (np.dstack([_blob(SIZE, SIZE), np.zeros((SIZE, SIZE), np.uint8), _blob(SIZE, SIZE)]), r"colour channels that differ"),
    ],
)
def test_non_binary_mask_is_a_problem(tmp_path, array, message):
    with pytest.raises(BadFile, match=message):
        read_mask(_png(tmp_path / "m.png", array), SIZE)


def test_jpeg_mask_noise_is_not_binary_with_hint(tmp_path):
    Image.fromarray(_noise(SIZE, SIZE)).save(tmp_path / "m.jpg")
    with pytest.raises(BadFile, match="not binary.*save masks as PNG"):
        read_mask(tmp_path / "m.jpg", SIZE)


# ----------------------------------------------------------------------------- splitting


NAMES = [f"{i:04d}" for i in range(100)]


def test_split_is_deterministic_complete_and_order_independent():
    fractions = SplitFractions()
    first = split_names(NAMES, fractions, seed=3)
    shuffled = NAMES[:]
    random.Random(9).shuffle(shuffled)
    assert split_names(shuffled, fractions, seed=3) == first
    assert split_names(list(reversed(NAMES)), fractions, seed=3) == first
    assert split_names(NAMES, fractions, seed=4) != first
    assert sorted(n for names in first.values() for n in names) == NAMES  # each name exactly once
    assert {s: len(v) for s, v in first.items()} == {"labeled": 20, "calibration": 10, "unlabeled": 50, "test": 20}


def test_split_fractions_and_minimum_one_each():
    few = split_names(NAMES[:5], SplitFractions(), seed=0)  # targets 1, 0.5, 2.5, 1
    assert all(len(few[s]) >= 1 for s in SPLITS) and sum(map(len, few.values())) == 5
    four = split_names(NAMES[:4], SplitFractions(0.1, 0.1, 0.7, 0.1), seed=0)
    assert all(len(four[s]) == 1 for s in SPLITS)
    no_cal = split_names(NAMES[:30], SplitFractions(0.3, 0.0, 0.4, 0.3), seed=0)
    assert no_cal["calibration"] == [] and [len(no_cal[s]) for s in ("labeled", "unlabeled", "test")] == [9, 12, 9]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_keeps_groups_whole(seed):
    rng = random.Random(seed)
    groups, names = {}, []
    for g in range(15):  # 15 patients with 1 to 8 images each
        for k in range(rng.randint(1, 8)):
            names.append(f"p{g:02d}_{k}")
            groups[names[-1]] = f"p{g:02d}"
    result = split_names(names, SplitFractions(), seed=seed, groups=groups)
    owner = {}
    for split, members in result.items():
        for name in members:
            assert owner.setdefault(groups[name], split) == split, f"group {groups[name]} in {owner[groups[name]]} and {split}"
    assert sorted(n for v in result.values() for n in v) == sorted(names)
    assert all(result[s] for s in SPLITS)
    assert len(result["unlabeled"]) == pytest.approx(0.5 * len(names), abs=8)


def test_group_keys_from_csv_by_file_name_or_stem(tmp_path):
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("image,sequence\nimages/0001.png,s1\n0002.jpg,s1\n0003,s2\n")
    groups = Groups(csv=csv_path)
    assert group_keys(["0001", "0002", "0003"], groups, tmp_path / "site.yaml") == {"0001": "s1", "0002": "s1", "0003": "s2"}
    with pytest.raises(ConfigError, match=r"site\.yaml: data\.groups\.csv: .*groups\.csv: no group for '0004' \(2 of 4"):
        group_keys(["0001", "0004", "0003", "0005"], groups, tmp_path / "site.yaml")
    with pytest.raises(ConfigError, match=r"groups\.csv: has no column 'patient'; columns are image, sequence"):
        group_keys(["0001"], Groups(csv=csv_path, column="patient"), tmp_path / "site.yaml")


def test_group_keys_from_pattern(tmp_path):
    groups = Groups(pattern=r"^(p\d+)_")
    assert group_keys(["p1_0", "p1_1", "p22_0"], groups) == {"p1_0": "p1", "p1_1": "p1", "p22_0": "p22"}
    with pytest.raises(ConfigError, match=r"data\.groups\.pattern: '\^\(p\\\\d\+\)_' does not match image 'x_3'"):
        group_keys(["p1_0", "x_3"], groups, tmp_path / "site.yaml")
    with pytest.raises(ConfigError, match="has no capturing group"):
        group_keys(["p1_0"], Groups(pattern=r"p\d+"))


# ----------------------------------------------------------------------------- a site


def test_explicit_folders_mixed_formats_and_optional_unlabeled_masks(tmp_path):
    root = tmp_path / "data"
    for split in SPLITS:
        _pairs(root / split, ["0001", "0002", "0003"])
    _png(root / "labeled" / "images" / "0004.png", _noise(20, 24, channels=3))  # RGB among gray
    _png(root / "labeled" / "masks" / "0004.png", _blob(20, 24))
    _nifti(root / "labeled" / "images" / "0005.nii.gz", _noise(20, 24))  # NIfTI pair
    _nifti(root / "labeled" / "masks" / "0005.nii.gz", _blob(20, 24, 1))
    site = _site(tmp_path, _explicit(root), channels=3)
    data = load_site_data(site)
    assert list(data) == list(SPLITS)
    labeled = data["labeled"]
    assert labeled.names == ["0001", "0002", "0003", "0004", "0005"] and labeled.skipped == []
    assert labeled.images.shape == (5, 3, SIZE, SIZE) and labeled.images.dtype == torch.float32
    assert labeled.masks.shape == (5, 1, SIZE, SIZE) and labeled.masks.dtype == torch.uint8
    assert set(labeled.masks.unique().tolist()) == {0, 1}
    torch.testing.assert_close(labeled.images.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    assert data["unlabeled"].masks is None and len(data["unlabeled"]) == 3
    # unlabeled masks, when configured, are carried (for the oracle judge and experiments)
    with_masks = load_site_data(_site(tmp_path, _explicit(root, unlabeled_masks=True)), splits=("unlabeled",))
    assert list(with_masks) == ["unlabeled"] and with_masks["unlabeled"].masks.shape == (3, 1, SIZE, SIZE)


def _bad_labeled_folder(folder: Path) -> dict[str, str]:
    """Two good pairs plus one of each bad case; returns {file name: expected reason}."""
    _pairs(folder, ["good1", "good2"])
    images, masks = folder / "images", folder / "masks"
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    _png(masks / "corrupt.png", _blob(20, 24))
    _png(images / "size.png", _noise(20, 24))
    _png(masks / "size.png", _blob(24, 20))
    _png(images / "multi.png", _noise(20, 24))
    _png(masks / "multi.png", np.arange(20 * 24, dtype=np.uint8).reshape(20, 24) % 3)
    _png(images / "nomask.png", _noise(20, 24))
    _png(masks / "noimage.png", _blob(20, 24))
    (images / "README.txt").write_text("not an image")
    (images / "list.csv").write_text("a,b\n")
    (images / ".hidden.png").write_bytes(b"junk")
    (images / "subfolder.png").mkdir()
    return {
        "corrupt.png": "cannot read",
        "size.png": "mask is 20x24 (WxH) but its image size.png is 24x20",
        "multi.png": "mask is not binary: values 0, 1, 2",
        "nomask.png": "image without mask",
        "noimage.png": "mask without image",
    }


def test_check_warns_about_a_split_under_min_images(tmp_path):
    root = tmp_path / "data"
    for split in SPLITS:
        _pairs(root / split, [f"{split}{i}" for i in range(4 if split == "calibration" else 6)])
    problems = check_site_data(_site(tmp_path, _explicit(root)))  # min_images 5 by default
    assert [(p.file, p.level) for p in problems] == [(root / "calibration" / "images", "warning")]
    assert "fewer than min_images 5: its figures are never sent" in problems[0].reason


def test_check_lists_every_problem_and_load_skips_bad_files(tmp_path, caplog):
    root = tmp_path / "data"
    expected = _bad_labeled_folder(root / "labeled")
    _pairs(root / "unlabeled", ["u1", "u2"])
    (root / "calibration" / "images").mkdir(parents=True)  # empty
    (root / "calibration" / "masks").mkdir(parents=True)
    _pairs(root / "test", ["t1"])  # a single image: warning
    site = _site(tmp_path, {**_explicit(root), "test": _folder(root / "test"), "calibration": _folder(root / "calibration")},
                 min_images=2)  # the small-split warning below is the plain one (min_images: see the next test)
    site_missing = _site(tmp_path / "m", {**_explicit(root), "calibration": _folder(tmp_path / "nowhere")})

    problems = check_site_data(site)
    assert all(isinstance(p, Problem) for p in problems)
    by_name = {p.file.name: p for p in problems}
    for name, reason in expected.items():
        assert reason in by_name[name].reason, str(by_name[name])
        assert by_name[name].level == "error" and str(by_name[name]).startswith(str(by_name[name].file) + ": ")
    assert "no images in this folder" in str(next(p for p in problems if p.file == root / "calibration" / "images"))
    warning = next(p for p in problems if p.level == "warning")
    assert warning.file == root / "test" / "images" and "'test' has 1 usable image" in warning.reason
    assert len(problems) == len(expected) + 3  # + empty images folder, empty masks folder, small split
    missing = check_site_data(site_missing)
    assert [str(p) for p in missing if p.level == "error"] == [
        f"{tmp_path / 'nowhere' / kind}: folder does not exist" for kind in ("images", "masks")
    ] + [
        str(p) for p in problems if p.file.parent.parent.name == "labeled"
    ]

    caplog.set_level(logging.WARNING, logger="shared.data")
    data = load_site_data(site, splits=("labeled", "unlabeled"))
    labeled = data["labeled"]
    assert labeled.names == ["good1", "good2"] and labeled.images.shape == (2, 1, SIZE, SIZE)
    assert labeled.masks.shape == (2, 1, SIZE, SIZE)
    assert sorted(p.file.name for p in labeled.skipped) == sorted(expected)
    assert "skipped 5 file(s), loaded 2 image(s)" in caplog.text
    assert all(name in caplog.text for name in expected)
    # nothing kept is a view of a bigger buffer (DESIGN.md's memory note)
    assert labeled.images.untyped_storage().nbytes() == labeled.images.numel() * 4
    assert labeled.masks.untyped_storage().nbytes() == labeled.masks.numel()

    for broken, folder in ((site, root / "calibration" / "images"), (site_missing, tmp_path / "nowhere" / "images")):
        with pytest.raises(ConfigError) as info:
            load_site_data(broken)
        message = str(info.value)
        assert "\n" not in message and f"data.calibration.images: {folder}: " in message
        assert message.startswith(str(broken.source_file))


def test_source_split_with_groups_and_source_level_problems(tmp_path):
    src = tmp_path / "src"
    stems = [f"p{p}_{k}" for p in range(6) for k in range(p % 3 + 2)]  # 6 patients, 2-4 images each
    _pairs(src, stems)
    _png(src / "masks" / "orphan.png", _blob(20, 24))
    _png(src / "images" / "dup.png", _noise(20, 24))
    Image.fromarray(_noise(20, 24)).save(src / "images" / "dup.jpg")
    _png(src / "masks" / "dup.png", _blob(20, 24))
    data = {
        "source": _folder(src),
        "split": {"labeled": 0.25, "calibration": 0.25, "unlabeled": 0.25, "test": 0.25},
        "seed": 5,
        "groups": {"pattern": r"^(p\d+)_"},
    }
    site = _site(tmp_path, data, min_images=2)  # splits of 2-7 images: no small-split warning here
    loaded = load_site_data(site)
    owner = {}
    for split, part in loaded.items():
        assert len(part) >= 1 and part.masks is not None and part.images.shape[0] == len(part.names)
        for name in part.names:
            assert owner.setdefault(name.split("_")[0], split) == split
        assert part.groups == [name.split("_")[0] for name in part.names]  # each image's group, in order
    assert sorted(n for part in loaded.values() for n in part.names) == sorted(stems)
    # problems of the shared folder that belong to no split are listed once, under the first split
    first = [p.file.name for p in loaded["labeled"].skipped]
    assert sorted(first) == ["dup.jpg", "dup.png", "dup.png", "orphan.png"]  # 2 images, their mask, an orphan
    assert "several images share its stem 'dup'" in loaded["labeled"].skipped[-2].reason
    assert all(not part.skipped for s, part in loaded.items() if s != "labeled")
    assert [p.file.name for p in load_site_data(site, splits=("test",))["test"].skipped] == first
    assert sorted(p.file.name for p in check_site_data(site)) == sorted(first)

    # a group CSV that misses images: one-line ConfigError when loading, a Problem when checking
    (tmp_path / "groups.csv").write_text("image,sequence\n" + "".join(f"{s}.png,{s[:2]}\n" for s in stems[1:]))
    site_csv = _site(tmp_path, {**data, "groups": {"csv": "groups.csv"}})
    with pytest.raises(ConfigError, match=rf"data\.groups\.csv: .*groups\.csv: no group for '{stems[0]}'"):
        load_site_data(site_csv)
    assert any("no group for" in p.reason for p in check_site_data(site_csv))


def test_source_split_is_reproducible(tmp_path):
    _pairs(tmp_path / "src", [f"{i:03d}" for i in range(12)])
    data = {"source": _folder(tmp_path / "src"), "split": {"labeled": 0.5, "calibration": 0.0, "unlabeled": 0.5, "test": 0.0}}
    a = load_site_data(_site(tmp_path, data), splits=("labeled",))["labeled"]
    b = load_site_data(_site(tmp_path, data), splits=("labeled",))["labeled"]
    c = load_site_data(_site(tmp_path, {**data, "seed": 1}), splits=("labeled",))["labeled"]
    assert a.names == b.names and torch.equal(a.images, b.images) and len(a) == 6
    assert c.names != a.names
    assert check_site_data(_site(tmp_path, data)) == []  # zero-fraction splits are empty on purpose: no warning


def test_unknown_split_name_is_rejected(tmp_path):
    _pairs(tmp_path / "src", ["a", "b"])
    site = _site(tmp_path, {"source": _folder(tmp_path / "src"), "split": {"labeled": 1.0, "calibration": 0, "unlabeled": 0, "test": 0}})
    with pytest.raises(ValueError, match="unknown split 'train'; valid splits are labeled, calibration"):
        load_site_data(site, splits=("train",))


# ----------------------------------------------------------------------------- bundled demo


@pytest.mark.parametrize("name", ["montgomery", "shenzhen_a", "shenzhen_b"])
def test_demo_site_loads(tmp_path, name):
    folder = DEMO / name
    data = {
        "source": _folder(folder),
        "split": {"labeled": 0.2, "calibration": 0.1, "unlabeled": 0.5, "test": 0.2},
        "seed": 0,
    }
    site = _site(tmp_path, data, image_size=128, name=name)
    loaded = load_site_data(site)
    assert {s: len(p) for s, p in loaded.items()} == {"labeled": 12, "calibration": 6, "unlabeled": 30, "test": 12}
    for part in loaded.values():
        assert part.images.shape[1:] == (1, 128, 128) and part.masks.shape[1:] == (1, 128, 128)
        assert part.skipped == [] and part.masks.min() == 0 and part.masks.max() == 1
        assert 0.05 < float(part.masks.float().mean()) < 0.5  # lungs are a fair share of a chest X-ray
    assert check_site_data(site) == []


def test_demo_sites_are_disjoint_and_documented():
    stems = {name: {p.name for p in (DEMO / name / "images").glob("*.png")} for name in ("montgomery", "shenzhen_a", "shenzhen_b")}
    assert {k: len(v) for k, v in stems.items()} == {"montgomery": 60, "shenzhen_a": 60, "shenzhen_b": 60}
    assert not stems["shenzhen_a"] & stems["shenzhen_b"]
    for name, files in stems.items():
        assert {p.name for p in (DEMO / name / "masks").glob("*.png")} == files
        assert len((DEMO / name / "manifest.csv").read_text().splitlines()) == 61
    readme = (DEMO / "README.md").read_text()
    assert "CC BY-NC-SA 4.0" in readme and "scripts/make_demo_data.py" in readme
