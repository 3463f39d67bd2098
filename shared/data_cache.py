"""A site's decoded, resized images and masks, kept in ``<work_dir>/cache/<split>.npy``.

Why: in deployment every message runs in a fresh process, and decoding and resizing the whole
site dataset again costs more per message than anything else the ClientApp does before
training. The cache stays on the site's disk (work_dir, mode 0700/0600: it holds the
site's images) and is never written into a data folder.

An entry is reused only when its image and mask files have the same path, mtime (ns) and size
as when they were decoded, and the split's image size, channels and decoder (shared/data.py's
source, numpy/torch/Pillow/MONAI versions) are unchanged; anything else is decoded again and
the split's file rewritten without the entries of files that are gone. A file modified in the
last ``RACY_S`` seconds is not stored (its mtime could repeat after a quick rewrite of the same
size, as in git's "racy clean" case): it is decoded again next time. A cache file that cannot
be read is ignored (one warning line) and rebuilt; one that cannot be written costs only time.
The file is three .npy arrays one after the other (a JSON header as bytes, the images, the
masks): read with plain file reads, 3-4x faster than an .npz, whose zip layer checks a CRC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from numpy.lib.format import read_array, write_array

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
RACY_S = 2.0
_FORMAT = 1

Key = tuple  # (image path, mtime_ns, size, mask path or None, mtime_ns, size)


def _decoder() -> str:
    """What else decides the decoded arrays: the decoding code and the libraries it calls."""
    import monai
    import PIL
    import torch

    code = hashlib.sha256((Path(__file__).parent / "data.py").read_bytes()).hexdigest()[:16]
    return f"{_FORMAT}:{code}:{np.__version__}:{torch.__version__}:{PIL.__version__}:{monai.__version__}"


def file_key(image: Path, mask: Path | None) -> Key | None:
    """The entry's key, or None when a file cannot be stat'ed (decoded, never stored)."""
    try:
        parts: list = []
        for path in (image, mask):
            if path is None:
                parts += [None, 0, 0]
            else:
                st = os.stat(path)
                parts += [str(path), st.st_mtime_ns, st.st_size]
    except OSError:
        return None
    return tuple(parts)


class SplitCache:
    """The cache file of one split of one site."""

    def __init__(self, work_dir: Path, split: str, size: int, channels: int, has_masks: bool) -> None:
        self.dir = Path(work_dir) / CACHE_DIR
        self.path = self.dir / f"{split}.npy"
        self.meta = {"decoder": _decoder(), "size": size, "channels": channels, "masks": has_masks}

    @classmethod
    def open(cls, work_dir: Path, split: str, size: int, channels: int, has_masks: bool,
             data_files: list[Path]) -> SplitCache | None:
        """The split's cache, or None (no caching, one warning) when work_dir/cache would lie
        inside a folder the data is read from."""
        cache = cls(work_dir, split, size, channels, has_masks)
        where = cache.dir.resolve()
        for folder in {Path(f).parent for f in data_files}:
            folder = folder.resolve()
            if where == folder or where.is_relative_to(folder):
                logger.warning("data cache off: %s is inside the data folder %s (move work_dir out of it)",
                               cache.dir, folder)
                return None
        return cache

    def load(self) -> tuple[dict[Key, int], np.ndarray | None, np.ndarray | None]:
        """({key: row}, images, masks) of the stored entries; empty when there is no usable file."""
        if not self.path.exists():
            return {}, None, None
        try:
            with open(self.path, "rb") as fh:
                meta = json.loads(read_array(fh, allow_pickle=False).tobytes().decode())
                images = read_array(fh, allow_pickle=False)
                masks = read_array(fh, allow_pickle=False) if self.meta["masks"] else None
            if any(meta.get(k) != v for k, v in self.meta.items()):
                return {}, None, None  # another image size, channels or decoder: rebuild
            keys = [tuple(k) for k in meta["keys"]]
            size, channels = self.meta["size"], self.meta["channels"]
            if images.shape != (len(keys), channels, size, size) or (
                    masks is not None and masks.shape != (len(keys), 1, size, size)):
                raise ValueError(f"arrays of shape {images.shape} for {len(keys)} entries")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt
            logger.warning("data cache %s unreadable (%s: %s); rebuilding it", self.path, type(exc).__name__, exc)
            return {}, None, None
        return {key: row for row, key in enumerate(keys)}, images, masks

    def save(self, keys: list[Key], images: np.ndarray, masks: np.ndarray | None) -> None:
        """Write the entries (those of recently modified files left out) atomically."""
        recent = time.time_ns() - int(RACY_S * 1e9)
        rows = [i for i, key in enumerate(keys) if key[1] < recent and (key[3] is None or key[4] < recent)]
        whole = len(rows) == len(keys)
        meta = dict(self.meta, keys=[list(keys[i]) for i in rows])
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                  "images": images if whole else images[rows]}
        if masks is not None:
            arrays["masks"] = masks if whole else masks[rows]
        tmp = None
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=f".{self.path.stem}-", suffix=".tmp",
                                             delete=False) as fh:
                tmp = fh.name
                for array in arrays.values():
                    write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("data cache %s not written (%s)", self.path, exc)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
