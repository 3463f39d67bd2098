"""Build the bundled demo sites from the staged lung_cxr data (outside the repository).

    python scripts/make_demo_data.py [--source ../shared/data/lung_cxr] [--out data/demo/lung_cxr]

Three sites, each `<site>/images/NNNN.png`, `<site>/masks/NNNN.png` and `<site>/manifest.csv`,
at 128x128 (images LANCZOS, masks thresholded at >=128 then NEAREST, so they stay {0, 255}):

- `montgomery/`: 60 of the 138 Montgomery cases, at evenly spaced positions in the sorted list;
- `shenzhen_a/`, `shenzhen_b/`: 120 of the 250 staged Shenzhen cases at evenly spaced positions,
  dealt alternately (1st, 3rd, ... to a; 2nd, 4th, ... to b), so the two halves are disjoint
  and both hold normal and TB cases.

File names keep the staged number NNNN; `manifest.csv` maps each file back to the staged file
and to the original file of the upstream repository. The output is deterministic: the same
source gives byte-identical PNGs. Each site folder is written to a temporary folder first and
swapped in whole, so a failed run never leaves a half-written site. The README next to the
sites (attribution, citations, terms) is kept as it is.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "lung_cxr"
DEFAULT_OUT = REPO / "data" / "demo" / "lung_cxr"
MANIFEST_COLUMNS = ("image", "mask", "source_image", "source_mask", "original_file", "foreground_fraction")


def evenly_spaced(items: list, count: int) -> list:
    """`count` items at evenly spaced positions (the first one included), in order."""
    if count > len(items):
        raise ValueError(f"asked for {count} items, only {len(items)} available")
    return [items[i * len(items) // count] for i in range(count)]


def site_selections(rows_by_source: dict[str, list[dict]]) -> dict[str, list[dict]]:
    shenzhen = evenly_spaced(rows_by_source["shenzhen"], 120)
    return {
        "montgomery": evenly_spaced(rows_by_source["montgomery"], 60),
        "shenzhen_a": shenzhen[0::2],
        "shenzhen_b": shenzhen[1::2],
    }


def read_manifest(source: Path) -> dict[str, list[dict]]:
    manifest = source / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found; pass --source pointing at the staged lung_cxr folder")
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    for name in by_source:
        by_source[name].sort(key=lambda r: r["image"])
    missing = {"montgomery", "shenzhen"} - set(by_source)
    if missing:
        raise SystemExit(f"{manifest}: no rows for source {sorted(missing)[0]!r}")
    return by_source


def shrink_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def shrink_mask(path: Path) -> tuple[Image.Image, float]:
    with Image.open(path) as img:
        binary = (np.asarray(img.convert("L")) >= 128).astype(np.uint8) * 255
    small = Image.fromarray(binary, mode="L").resize((SIZE, SIZE), Image.Resampling.NEAREST)
    return small, float((np.asarray(small) > 0).mean())


def write_site(source: Path, out: Path, rows: list[dict]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    manifest = []
    for row in rows:
        name = Path(row["image"]).name
        if Path(row["mask"]).name != name:
            raise SystemExit(f"{source / 'manifest.csv'}: image {row['image']} and mask {row['mask']} differ in name")
        shrink_image(source / row["image"]).save(tmp / "images" / name, optimize=True)
        mask, fraction = shrink_mask(source / row["mask"])
        mask.save(tmp / "masks" / name, optimize=True)
        manifest.append({
            "image": f"images/{name}",
            "mask": f"masks/{name}",
            "source_image": row["image"],
            "source_mask": row["mask"],
            "original_file": row["original_file"],
            "foreground_fraction": f"{fraction:.5f}",
        })
    with (tmp / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"staged lung_cxr folder (default {DEFAULT_SOURCE})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"demo folder to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    selections = site_selections(read_manifest(args.source))
    a, b = ({r["image"] for r in selections[s]} for s in ("shenzhen_a", "shenzhen_b"))
    assert not a & b, "shenzhen_a and shenzhen_b overlap"
    args.out.mkdir(parents=True, exist_ok=True)
    for site, rows in selections.items():
        write_site(args.source, args.out / site, rows)
        print(f"{args.out / site}: {len(rows)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
