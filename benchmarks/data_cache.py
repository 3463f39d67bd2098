"""Per-message data loading of one site, without and with the work_dir cache (shared/data_cache.py).

A train message loads every split of its site (`load_site_data(site)`); in deployment each
message is a fresh process, so without the cache it decodes and resizes the whole dataset
every time. This loads the site (default: the polyp consortium's Kvasir-SEG site, 700 RGB
frames at its image_size) --repeat times each way in one process, with the cache in a
temporary work_dir, and prints the median of each and their ratio. Timings depend on the
machine's load, which is printed.

    .venv/bin/python benchmarks/data_cache.py --site sites/polyp/kvasir_seg.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import load_site  # noqa: E402
from shared.data import load_site_data  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "sites" / "polyp" / "kvasir_seg.yaml")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as work:
        site = dataclasses.replace(load_site(args.site), work_dir=Path(work))
        splits = load_site_data(site, cache=False)
        images = sum(len(part) for part in splits.values())
        print(f"site {site.name}: {images} images, {site.image_size}px, {site.channels} channel(s); "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine)", flush=True)
        build = timed(lambda: load_site_data(site))  # decode every file, write the cache
        before, after = [], []
        for _ in range(args.repeat):
            before.append(timed(lambda: load_site_data(site, cache=False)))
            after.append(timed(lambda: load_site_data(site)))
        size = sum(f.stat().st_size for f in (Path(work) / "cache").iterdir()) / 2**20
    b, a = statistics.median(before), statistics.median(after)
    print(f"per message, median of {args.repeat}: no cache {b:.2f}s, cache hit {a:.3f}s, "
          f"ratio {b / a:.0f}x (first load writing the cache {build:.2f}s; cache {size:.0f} MiB); "
          f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
