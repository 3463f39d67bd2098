"""shared/data_cache.py: a site's decoded splits are reused from work_dir, and only while current."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import shared.data as data
from shared.config import SPLITS, load_site
from shared.data import load_site_data
from shared.data_cache import SplitCache

SIZE = 16


def _png(path: Path, array: np.ndarray, age_s: float = 60.0) -> None:
    """Write a PNG dated `age_s` in the past (older than the cache's racy window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    past = time.time() - age_s
    os.utime(path, (past, past))


def _image(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _mask(h: int = 20, w: int = 24) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[5:15, 8:16] = 255
    return mask


@pytest.fixture
def site(tmp_path):
    """Explicit split folders, three pairs each, under tmp/data; work_dir tmp/work."""
    root = tmp_path / "data"
    for s in SPLITS:
        for i in range(3):
            _png(root / s / "images" / f"p{i}.png", _image(10 * SPLITS.index(s) + i))
            _png(root / s / "masks" / f"p{i}.png", _mask())
    path = tmp_path / "site.yaml"
    folders = {s: {"images": str(root / s / "images"), "masks": str(root / s / "masks")} for s in SPLITS}
    path.write_text(yaml.safe_dump({"name": "t", "work_dir": str(tmp_path / "work"), "image_size": SIZE,
                                    "data": folders}))
    return load_site(path)


@pytest.fixture
def decoded(monkeypatch):
    """The files shared.data decodes, in order."""
    paths: list[str] = []
    read = data._read_array

    def counting(path, reader):
        paths.append(Path(path).name)
        return read(path, reader)

    monkeypatch.setattr(data, "_read_array", counting)
    return paths


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for split in a:
        assert a[split].names == b[split].names
        assert torch.equal(a[split].images, b[split].images)
        assert torch.equal(a[split].masks, b[split].masks)


def test_a_hit_decodes_nothing_and_gives_identical_tensors(site, decoded):
    plain = load_site_data(site, cache=False)
    decoded.clear()
    first = load_site_data(site)
    assert len(decoded) == 2 * 3 * len(SPLITS)  # nothing cached yet: every image and mask
    decoded.clear()
    again = load_site_data(site)
    assert decoded == []
    _same(plain, first)
    _same(plain, again)
    assert sorted(p.name for p in (site.work_dir / "cache").iterdir()) == [f"{s}.npy" for s in sorted(SPLITS)]


def test_a_touched_or_modified_file_is_decoded_again(site, decoded):
    load_site_data(site)
    labeled = site.data.labeled.images
    os.utime(labeled / "p1.png", (time.time() - 30, time.time() - 30))  # touched: new mtime
    _png(labeled / "p2.png", _image(99), age_s=20)  # new content
    decoded.clear()
    loaded = load_site_data(site)
    assert sorted(decoded) == ["p1.png", "p1.png", "p2.png", "p2.png"]  # image and mask of each
    _same(loaded, load_site_data(site, cache=False))
    decoded.clear()
    load_site_data(site)
    assert decoded == []  # the rebuilt entries are stored


def test_a_removed_file_disappears_and_an_added_one_appears(site, decoded):
    load_site_data(site)
    test_images, test_masks = site.data.test.images, site.data.test.masks
    (test_images / "p0.png").unlink()
    (test_masks / "p0.png").unlink()
    _png(test_images / "new.png", _image(7))
    _png(test_masks / "new.png", _mask())
    decoded.clear()
    loaded = load_site_data(site, splits=("test",))["test"]
    assert loaded.names == ["new", "p1", "p2"] and sorted(decoded) == ["new.png", "new.png"]
    _same({"test": loaded}, load_site_data(site, splits=("test",), cache=False))
    stored, images, _ = SplitCache(site.work_dir, "test", SIZE, 1, True).load()
    assert images.shape[0] == 3 and not any("p0.png" in str(key[0]) for key in stored)


def test_another_image_size_rebuilds(site, decoded):
    import dataclasses

    load_site_data(site, splits=("labeled",))
    bigger = dataclasses.replace(site, image_size=2 * SIZE)
    decoded.clear()
    loaded = load_site_data(bigger, splits=("labeled",))["labeled"]
    assert loaded.images.shape == (3, 1, 2 * SIZE, 2 * SIZE) and len(decoded) == 6


def test_a_corrupt_cache_file_is_rebuilt_with_one_warning(site, decoded, caplog):
    expected = load_site_data(site, splits=("labeled",))
    (site.work_dir / "cache" / "labeled.npy").write_bytes(b"\x93NUMPY truncated")
    decoded.clear()
    with caplog.at_level(logging.WARNING, logger="shared.data_cache"):
        loaded = load_site_data(site, splits=("labeled",))
    assert len([r for r in caplog.records if r.name == "shared.data_cache"]) == 1
    assert "unreadable" in caplog.text and len(decoded) == 6
    _same(expected, loaded)
    decoded.clear()
    load_site_data(site, splits=("labeled",))
    assert decoded == []


def test_recently_modified_files_are_not_stored(site, decoded):
    _png(site.data.labeled.images / "p0.png", _image(5), age_s=0)  # just written
    load_site_data(site, splits=("labeled",))
    decoded.clear()
    load_site_data(site, splits=("labeled",))
    assert decoded == ["p0.png", "p0.png"]  # only the racy pair is decoded again


def test_the_cache_lives_only_in_work_dir(site, tmp_path):
    before = sorted(str(p) for p in (tmp_path / "data").rglob("*"))
    load_site_data(site)
    assert sorted(str(p) for p in (tmp_path / "data").rglob("*")) == before
    cache = site.work_dir / "cache"
    assert cache.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache.iterdir())


def test_no_cache_when_work_dir_is_inside_the_data_folder(site, caplog):
    import dataclasses

    inside = dataclasses.replace(site, work_dir=site.data.labeled.images / "work")
    with caplog.at_level(logging.WARNING, logger="shared.data_cache"):
        load_site_data(inside, splits=("labeled",))
    assert "data cache off" in caplog.text
    assert not (inside.work_dir / "cache").exists()
