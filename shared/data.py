"""A site's images and masks: read, paired, checked, split and stacked into tensors.

A split is a folder of images and (except for the unlabelled split) a folder of masks, paired
by file stem: `images/0001.png` goes with `masks/0001.png` (or `0001.jpg`, `0001.nii.gz`, ...).
Images may be 8/16-bit grayscale or RGB PNG/JPEG, or 2-D NIfTI; masks must be binary
(0 and one positive value, e.g. 0/1 or 0/255). Everything is resized to the site's
`image_size` (images bilinear with antialiasing, masks nearest-neighbour, so they stay binary)
and each image is normalised on its own to zero mean and unit standard deviation.

A bad file (unreadable, a mask that is not binary or not the size of its image, an image
without its mask, ...) never stops loading: it is skipped with a warning and listed in
`SplitData.skipped` as a `Problem`. Only an unusable configuration (a folder that does not
exist or holds no images, a group CSV that does not cover the images) raises a `ConfigError`.
`check_site_data` runs the same loading but collects every problem instead, for
`fl-client check --site FILE`.

Orientation: PNG/JPEG arrays are read row by row (H, W). NIfTI arrays are indexed (x, y), as
MONAI, ITK and NIfTI viewers see them, and are transposed to (H, W) = (y, x), so a 2-D image
saved through MONAI/ITK to NIfTI reads back the same way as its PNG.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import NibabelReader, PILReader

from shared.config import SPLITS, ConfigError, Folder, Groups, SiteConfig, SplitFractions

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".png", ".jpg", ".jpeg", ".nii")
_LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")
_MIN_SPLIT_SIZE = 2


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: the file (or folder) and what is wrong with it.

    `level` is "error" (the file is skipped, the folder is unusable) or "warning" (the data
    loads but is probably not what was meant, e.g. a split with a single image).
    """

    file: Path
    reason: str
    level: str = "error"

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


class BadFile(ValueError):
    """A file that cannot be used; `problem` says which and why."""

    def __init__(self, file: Path | str, reason: str):
        self.problem = Problem(Path(file), reason)
        super().__init__(str(self.problem))


class _Unusable(Exception):
    """A configured folder or group file that makes a split unusable (ConfigError when loading)."""

    def __init__(self, key: str, problem: Problem, *more: Problem):
        self.key = key
        self.problem = problem
        self.problems = [problem, *more]
        super().__init__(str(problem))

    def config_error(self, source_file: Path | None) -> ConfigError:
        if self.problem.file == _where(source_file):  # the reason already starts with the key
            return ConfigError(str(self.problem))
        return ConfigError(f"{_where(source_file)}: {self.key}: {self.problem}")


def _where(source_file: Path | None) -> Path:
    return Path(source_file) if source_file is not None else Path("<site>")


# ----------------------------------------------------------------------------- one file


def _image_mode(img):
    """Pillow modes we read as they are: gray (8/16/32-bit, float) and RGB; the rest -> L or RGB."""
    if img.mode in ("L", "RGB", "F") or img.mode.startswith("I"):
        return img
    return img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")


def _mask_mode(img):
    """Masks keep palette indices (a 'P' mask stores labels, not colours); alpha is dropped."""
    if img.mode in ("L", "P", "RGB", "F") or img.mode.startswith("I"):
        return img
    return img.convert("L" if img.mode in ("1", "LA", "La", "PA") else "RGB")


# Stateless readers (their only settings are fixed here); MONAI's PIL reader returns (W, H[, C])
# unless reverse_indexing is off, which gives the row-major (H, W[, C]) we want directly.
_PIL_IMAGE = PILReader(converter=_image_mode, reverse_indexing=False)
_PIL_MASK = PILReader(converter=_mask_mode, reverse_indexing=False)
_NIFTI = NibabelReader()


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _read_array(path: Path, reader: PILReader) -> np.ndarray:
    """(H, W) or (H, W, C) array of one 2-D image file; BadFile when it cannot be used."""
    try:
        if _suffix(path) in (".nii", ".nii.gz"):
            data = np.asarray(_NIFTI.get_data(_NIFTI.read(path))[0])
            shape = data.shape
            while data.ndim > 2 and 1 in data.shape:  # drop singleton axes: (X, Y, 1) is 2-D
                data = data.squeeze(axis=max(i for i, s in enumerate(data.shape) if s == 1))
            if data.ndim != 2:
                raise BadFile(path, f"is a {len(shape)}-D volume of shape {shape}; expected a 2-D image")
            return data.T
        return np.asarray(reader.get_data(reader.read(path))[0])
    except BadFile:
        raise
    except Exception as exc:  # any reader failure (truncated, not an image, bad header) is one bad file
        raise BadFile(path, f"cannot read: {type(exc).__name__}: {exc}") from None


def _image_tensor(array: np.ndarray, path: Path, size: int, channels: int) -> torch.Tensor:
    if array.dtype.kind == "f" and not np.isfinite(array).all():  # (numpy: cheaper than torch here)
        raise BadFile(path, "contains NaN or infinite values")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] not in (1, 3):
        raise BadFile(path, f"has {x.shape[0]} channels; expected 1 (gray) or 3 (RGB)")
    if channels == 1 and x.shape[0] == 3:
        x = (_LUMINANCE[0] * x[0] + _LUMINANCE[1] * x[1] + _LUMINANCE[2] * x[2])[None]
    if x.amin() == x.amax():  # a constant image becomes zeros (resizing would add rounding noise)
        return torch.zeros((channels, size, size), dtype=torch.float32)
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    std, mean = torch.std_mean(x, correction=0)
    x = (x - mean) / std if std > 0 else x - mean
    return x.repeat(3, 1, 1) if channels == 3 and x.shape[0] == 1 else x


def _values(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def _mask_tensor(array: np.ndarray, path: Path, size: int) -> torch.Tensor:
    if array.ndim == 3:
        if array.shape[2] > 1 and not (array == array[..., :1]).all():
            raise BadFile(path, f"mask has {array.shape[2]} colour channels that differ; expected a single-channel (gray) mask")
        array = array[..., 0]
    values = _values(array)
    binary = np.isfinite(values).all() and (len(values) == 1 or (len(values) == 2 and values[0] == 0 and values[1] > 0))
    if not binary:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (f", ... ({len(values)} values)" if len(values) > 6 else "")
        hint = "; JPEG compression blurs mask edges, save masks as PNG" if _suffix(path) in (".jpg", ".jpeg") else ""
        raise BadFile(path, f"mask is not binary: values {shown} (expected 0 and one positive value, e.g. 0/1 or 0/255{hint})")
    mask = torch.from_numpy((array > 0).astype(np.uint8))[None]
    if tuple(mask.shape[1:]) != (size, size):
        mask = F.interpolate(mask[None], size=(size, size), mode="nearest-exact")[0]
    return mask


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image as a (channels, size, size) float32 tensor, normalised to zero mean, unit std.

    Gray input is repeated to 3 channels, RGB is reduced to luminance for 1; 2-D NIfTI (or 3-D
    with a singleton axis) is accepted. Raises BadFile (a ValueError) for an unusable file.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    return _image_tensor(_read_array(path, _PIL_IMAGE), path, size, channels)


def read_mask(path: str | Path, size: int) -> torch.Tensor:
    """One binary mask as a (1, size, size) uint8 tensor in {0, 1} (nearest-neighbour resize).

    Accepts exactly two values {0, v} with v > 0 (or a single value), as one channel or as
    identical RGB channels. Raises BadFile (a ValueError) otherwise.
    """
    path = Path(path)
    return _mask_tensor(_read_array(path, _PIL_MASK), path, size)


# ----------------------------------------------------------------------------- splitting


def split_names(
    names: list[str],
    fractions: SplitFractions,
    seed: int,
    groups: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Cut `names` into the four splits, keeping each group whole.

    Deterministic for a seed whatever the input order. Groups (each name its own group when
    `groups` is None) are shuffled by the seed and given one by one to the split furthest below
    its target share; then every split with a non-zero fraction that is still empty takes the
    smallest group of the split furthest above its target, where that split can spare one.
    Returns {split: sorted names} for every split in SPLITS.
    """
    names = sorted(set(names))
    shares = {s: getattr(fractions, s) for s in SPLITS}
    active = [s for s in SPLITS if shares[s] > 0]
    if not active:
        raise ValueError("every split fraction is 0: nothing to split into")
    members: dict[str, list[str]] = {}
    for name in names:
        if groups is not None and name not in groups:
            raise ValueError(f"no group key for name {name!r}")
        members.setdefault(groups[name] if groups is not None else name, []).append(name)
    order = sorted(members)
    random.Random(seed).shuffle(order)

    target = {s: shares[s] * len(names) for s in SPLITS}
    count = dict.fromkeys(SPLITS, 0)
    assigned: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key in order:
        split = max(active, key=lambda s: target[s] - count[s])
        assigned[split].append(key)
        count[split] += len(members[key])

    for split in active:
        if assigned[split]:
            continue
        donors = [s for s in active if len(assigned[s]) >= 2]
        if not donors:
            break
        donor = max(donors, key=lambda s: count[s] - target[s])
        key = min(assigned[donor], key=lambda k: (len(members[k]), k))
        assigned[donor].remove(key)
        assigned[split].append(key)
        count[donor] -= len(members[key])
        count[split] += len(members[key])

    return {s: sorted(n for key in assigned[s] for n in members[key]) for s in SPLITS}


def group_keys(names: list[str], groups: Groups, source_file: Path | None = None) -> dict[str, str]:
    """The group (patient, video sequence) of each name, from `groups.csv` or `groups.pattern`.

    CSV keys are matched by stem, so `images/0001.png`, `0001.png` and `0001` all name `0001`.
    Raises ConfigError (naming `source_file`, the key and the CSV or pattern) when a name has no
    group, the CSV lacks a column, or the pattern has no capturing group.
    """
    try:
        return _group_keys(names, groups, source_file)
    except _Unusable as exc:
        raise exc.config_error(source_file) from None


def _group_keys(names: list[str], groups: Groups, source_file: Path | None) -> dict[str, str]:
    if groups.csv is not None:
        table = _read_group_csv(groups)
        missing = [n for n in names if _stem(Path(n)) not in table]
        if missing:
            raise _Unusable("data.groups.csv", Problem(groups.csv, (
                f"no group for {missing[0]!r} ({len(missing)} of {len(names)} names missing): column "
                f"{groups.key_column!r} must list every image, by file name or stem"
            )))
        return {n: table[_stem(Path(n))] for n in names}
    if groups.pattern is None:
        raise ValueError("groups needs csv or pattern")
    pattern = re.compile(groups.pattern)
    key = "data.groups.pattern"
    if pattern.groups < 1:
        raise _Unusable(key, Problem(_where(source_file), f"{key}: {groups.pattern!r} has no capturing group: put the group key in ( )"))
    keys = {}
    for name in names:
        match = pattern.search(_stem(Path(name)))
        if match is None or match.group(1) is None:
            raise _Unusable(key, Problem(_where(source_file), (
                f"{key}: {groups.pattern!r} does not match image {name!r}: its first group, searched in each image's stem, is the group key"
            )))
        keys[name] = match.group(1)
    return keys


def _read_group_csv(groups: Groups) -> dict[str, str]:
    path = groups.csv
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _Unusable("data.groups.csv", Problem(path, f"cannot read: {exc}")) from None
    for column in (groups.key_column, groups.column):
        if column not in columns:
            raise _Unusable("data.groups.csv", Problem(path, (
                f"has no column {column!r}; columns are {', '.join(columns) or 'none (empty file)'} "
                "(set data.groups.key_column / data.groups.column)"
            )))
    table: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        key, group = _stem(Path((row[groups.key_column] or "").strip())), (row[groups.column] or "").strip()
        if not key or not group:
            raise _Unusable("data.groups.csv", Problem(path, f"line {line}: empty {groups.key_column!r} or {groups.column!r}"))
        if table.setdefault(key, group) != group:
            raise _Unusable("data.groups.csv", Problem(path, f"line {line}: {key!r} is in both group {table[key]!r} and {group!r}"))
    return table


# ----------------------------------------------------------------------------- one split


@dataclass
class SplitData:
    """One split in memory.

    images: (N, C, H, W) float32, each image normalised to zero mean and unit std.
    masks: (N, 1, H, W) uint8 in {0, 1}, or None for a split without masks.
    names: the N file stems, in the order of the tensors. skipped: the files left out, and why.
    groups: each image's group (patient, video sequence) from `data.groups`, or None: kept whole
    by the site's splits and by the out-of-fold folds of its learned and federated judges.
    """

    names: list[str]
    images: torch.Tensor
    masks: torch.Tensor | None
    skipped: list[Problem] = field(default_factory=list)
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class _Pairs:
    """What one split will read: (name, image, mask or None) triples and the pairing problems."""

    folder: Path
    has_masks: bool
    wanted: bool = True  # False for a split given a zero fraction of data.source: empty on purpose
    pairs: list[tuple[str, Path, Path | None]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    groups: dict[str, str] | None = None  # name -> group (data.groups), when the split was cut by group


def _list_files(folder: Path, key: str, what: str) -> tuple[dict[str, Path], list[Problem], set[str]]:
    """{stem: file} of the image files in a folder, the problems, and the stems several files share.

    Other files (README, .csv, hidden files, subfolders) are ignored.
    """
    if not folder.exists():
        raise _Unusable(key, Problem(folder, "folder does not exist"))
    if not folder.is_dir():
        raise _Unusable(key, Problem(folder, "is not a folder"))
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or _suffix(path) is None or not path.is_file():
            continue
        by_stem.setdefault(_stem(path), []).append(path)
    if not by_stem:
        raise _Unusable(key, Problem(folder, f"no {what} in this folder (expected {', '.join(IMAGE_SUFFIXES)} files)"))
    files, problems, clashes = {}, [], set()
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            files[stem] = paths[0]
        else:
            clashes.add(stem)
            others = ", ".join(p.name for p in paths)
            problems += [Problem(p, f"several files share the stem {stem!r} ({others}); all are skipped") for p in paths]
    return files, problems, clashes


def _pair(folder: Folder, key: str) -> tuple[dict[str, tuple[Path | None, Path | None]], list[Problem]]:
    """{stem: (image or None, mask or None)} of a folder pair, and the problems found listing it."""
    unusable: list[_Unusable] = []
    listed = {}
    for kind, path in (("images", folder.images), ("masks", folder.masks)):
        if path is None:
            listed[kind] = ({}, [], set())
            continue
        try:
            listed[kind] = _list_files(path, f"{key}.{kind}", kind)
        except _Unusable as exc:
            unusable.append(exc)
    if unusable:  # report both folders when both are unusable
        raise _Unusable(unusable[0].key, *(p for exc in unusable for p in exc.problems))
    (images, problems, image_clashes), (masks, mask_problems, mask_clashes) = listed["images"], listed["masks"]
    problems += mask_problems
    for stem in sorted(image_clashes & masks.keys()):
        problems.append(Problem(masks.pop(stem), f"skipped: several images share its stem {stem!r}"))
    for stem in sorted(mask_clashes & images.keys()):
        problems.append(Problem(images.pop(stem), f"skipped: several masks share its stem {stem!r}"))
    return {s: (images.get(s), masks.get(s)) for s in sorted(images.keys() | masks.keys())}, problems


def _add(plan: _Pairs, stem: str, image: Path | None, mask: Path | None) -> None:
    if image is None:
        plan.problems.append(Problem(mask, f"mask without image: no {stem}.* in {plan.folder}"))
    elif plan.has_masks and mask is None:
        plan.problems.append(Problem(image, f"image without mask: no {stem}.* in the masks folder"))
    else:
        plan.pairs.append((stem, image, mask))


def _read_split(plan: _Pairs, size: int, channels: int, keep: bool) -> SplitData:
    """Read every pair of a split; bad files become Problems. keep=False reads but keeps nothing."""
    n = len(plan.pairs) if keep else 0
    images = torch.empty((n, channels, size, size), dtype=torch.float32)
    masks = torch.empty((n, 1, size, size), dtype=torch.uint8) if plan.has_masks else None
    names, problems = [], list(plan.problems)
    for name, image_path, mask_path in plan.pairs:
        try:
            image_array = _read_array(image_path, _PIL_IMAGE)
        except BadFile as exc:
            image_array = None
            problems.append(exc.problem)
        try:
            mask_array = _read_array(mask_path, _PIL_MASK) if mask_path is not None else None
        except BadFile as exc:
            problems.append(exc.problem)
            continue
        if image_array is None:
            continue
        try:
            if mask_array is not None and mask_array.shape[:2] != image_array.shape[:2]:
                raise BadFile(mask_path, (
                    f"mask is {mask_array.shape[1]}x{mask_array.shape[0]} (WxH) but its image {image_path.name} "
                    f"is {image_array.shape[1]}x{image_array.shape[0]}; a pair must have the same size"
                ))
            mask = _mask_tensor(mask_array, mask_path, size) if mask_array is not None else None
            image = _image_tensor(image_array, image_path, size, channels)
        except BadFile as exc:
            problems.append(exc.problem)
            continue
        if keep:
            images[len(names)] = image
            if masks is not None:
                masks[len(names)] = mask
        names.append(name)
    if keep and len(names) < n:  # copy, so the tensors kept do not hold the unused rows alive
        images = images[: len(names)].clone()
        masks = masks[: len(names)].clone() if masks is not None else None
    return SplitData(names=names, images=images, masks=masks, skipped=problems, groups=_groups_of(plan, names))


def _read_split_cached(plan: _Pairs, split: str, site: SiteConfig) -> SplitData:
    """`_read_split`, decoding only the pairs `shared.data_cache` has no current entry for."""
    from shared.data_cache import SplitCache, file_key

    size, channels = site.image_size, site.channels
    files = [f for _, image, mask in plan.pairs for f in (image, mask) if f is not None]
    cache = SplitCache.open(site.work_dir, split, size, channels, plan.has_masks, files)
    if cache is None:
        return _read_split(plan, size, channels, keep=True)
    keys = [file_key(image, mask) for _, image, mask in plan.pairs]
    stored, cached_images, cached_masks = cache.load()
    misses = [pair for pair, key in zip(plan.pairs, keys) if key not in stored]
    fresh = _read_split(_Pairs(plan.folder, plan.has_masks, pairs=misses), size, channels, keep=True)
    fresh_row = {name: row for row, name in enumerate(fresh.names)}
    names, kept, rows = [], [], []  # rows: ("c", cached row) or ("f", fresh row)
    for (name, _, _), key in zip(plan.pairs, keys):
        if key in stored:
            rows.append(("c", stored[key]))
        elif name in fresh_row:
            rows.append(("f", fresh_row[name]))
        else:
            continue  # a bad file: skipped, its problem in fresh.skipped
        names.append(name)
        kept.append(key)

    def stack(cached: np.ndarray | None, new: torch.Tensor | None) -> torch.Tensor | None:
        if new is None:
            return None
        if cached is not None and rows == [("c", i) for i in range(len(cached))]:
            return torch.from_numpy(cached)  # every entry cached, in order: no copy
        parts = [torch.from_numpy(cached[r]) if kind == "c" else new[r] for kind, r in rows]
        return torch.stack(parts) if parts else new[:0]

    images, masks = stack(cached_images, fresh.images), stack(cached_masks, fresh.masks)
    storable = [i for i, key in enumerate(kept) if key is not None]  # None: could not stat
    if {kept[i] for i in storable} != set(stored):  # added, changed or removed files
        cache.save([kept[i] for i in storable], images.numpy()[storable],
                   masks.numpy()[storable] if masks is not None else None)
    return SplitData(names=names, images=images, masks=masks, skipped=list(plan.problems) + fresh.skipped,
                     groups=_groups_of(plan, names))


def _groups_of(plan: _Pairs, names: list[str]) -> list[str] | None:
    return [plan.groups[name] for name in names] if plan.groups is not None else None


# ----------------------------------------------------------------------------- a site


def _plans(site: SiteConfig, splits: tuple[str, ...], collect: list[Problem] | None) -> dict[str, _Pairs]:
    """Which files each split reads. An unusable folder raises _Unusable, or when `collect` is a
    list (checking), is appended to it and its split (or, for data.source, every split) dropped."""
    data = site.data

    def attempt(fn, *args):
        try:
            return fn(*args)
        except _Unusable as exc:
            if collect is None:
                raise
            collect.extend(exc.problems)
            return None

    plans: dict[str, _Pairs] = {}
    if data.source is None:
        for split in splits:
            folder: Folder = getattr(data, split)
            listed = attempt(_pair, folder, f"data.{split}")
            if listed is None:
                continue
            entries, problems = listed
            plan = _Pairs(folder.images, folder.masks is not None, problems=problems)
            for stem, (image, mask) in entries.items():
                _add(plan, stem, image, mask)
            plans[split] = plan
        return plans

    listed = attempt(_pair, data.source, "data.source")
    if listed is None:
        return plans
    entries, problems = listed
    stems = [s for s, (image, _) in entries.items() if image is not None]
    keys = attempt(_group_keys, stems, data.groups, site.source_file) if data.groups is not None else None
    assignment = split_names(stems, data.split, data.seed, keys)
    for split in splits:
        plan = _Pairs(data.source.images, True, wanted=getattr(data.split, split) > 0, groups=keys)
        for stem in assignment[split]:
            _add(plan, stem, *entries[stem])
        plans[split] = plan
    if plans:  # files that belong to no split (a mask without image, a clash) go under the first split
        first = plans[splits[0]]
        first.problems[:0] = problems
        for stem, (image, mask) in entries.items():
            if image is None:
                _add(first, stem, image, mask)
    return plans


@contextmanager
def _one_thread():
    """Per-file tensor work is tiny: torch's intra-op threads only add overhead there, and on a
    busy machine (threads spinning for cores) they made reading 30x slower. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load(site: SiteConfig, splits: tuple[str, ...], checking: bool,
          cache: bool = False) -> tuple[dict[str, SplitData], list[Problem]]:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split {bad[0]!r}; valid splits are {', '.join(SPLITS)}")
    unusable: list[Problem] | None = [] if checking else None
    try:
        plans = _plans(site, tuple(splits), unusable)
    except _Unusable as exc:
        raise exc.config_error(site.source_file) from None
    with _one_thread():
        loaded = {split: _read_split_cached(plan, split, site) if cache and not checking
                  else _read_split(plan, site.image_size, site.channels, keep=not checking)
                  for split, plan in plans.items()}
    # below min_images a split's figures stay at the site and a round that trains on it fails
    least = max(_MIN_SPLIT_SIZE, site.min_images)
    warnings = [
        Problem(plans[split].folder, f"split {split!r} has {len(part)} usable image(s), fewer than "
                + (f"min_images {site.min_images}: its figures are never sent and a round that trains on it "
                   "fails as too-few-images" if site.min_images > _MIN_SPLIT_SIZE else f"{_MIN_SPLIT_SIZE}"), "warning")
        for split, part in loaded.items()
        if len(part) < least and plans[split].wanted
    ]
    return loaded, (unusable or []) + warnings


def load_site_data(site: SiteConfig, splits: tuple[str, ...] = SPLITS, cache: bool = True) -> dict[str, SplitData]:
    """Load the requested splits of a site: {split: SplitData}.

    Explicit split folders, or `data.source` cut by `data.split` fractions, `data.seed` and
    `data.groups`. Bad files are skipped (a warning each, then a count per split) and listed in
    `SplitData.skipped`; files of a shared source folder that belong to no split (a mask without
    image) are listed under the first split requested. The unlabelled split carries masks when
    it has them (for the oracle judge and evaluation only). Raises ConfigError, naming the
    folder, when a folder does not exist or holds no images, or the groups do not cover them.
    With `cache`, decoded files are reused from `<work_dir>/cache` (`shared.data_cache`).
    """
    loaded, warnings = _load(site, tuple(splits), checking=False, cache=cache)
    for split, part in loaded.items():
        for problem in part.skipped:
            logger.warning("%s", problem)
        if part.skipped:
            logger.warning("site %s, split %s: skipped %d file(s), loaded %d image(s)", site.name, split, len(part.skipped), len(part))
    for problem in warnings:
        logger.warning("%s", problem)
    return loaded


def check_site_data(site: SiteConfig) -> list[Problem]:
    """Every problem of every split (errors, then warnings such as a split with < 2 images).

    The same loading as `load_site_data`, reading and checking every file but keeping nothing,
    and collecting unusable folders as problems instead of raising. An empty list: all good.
    """
    loaded, other = _load(site, SPLITS, checking=True)
    errors = [p for part in loaded.values() for p in part.skipped]
    return [p for p in other if p.level == "error"] + errors + [p for p in other if p.level != "error"]
