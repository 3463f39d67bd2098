"""Predict throughput: `fl-client predict` against plain batched inference, in the same run.

    python benchmarks/predict.py [--images DIR] [--count 500] [--repeats 3] [--threads N]

Both read the same images with the training reader, run the demo consortium's network (MONAI
UNet 16-32-64-128, 1 channel, 128 px; random weights: the speed does not depend on them) in
batches of 8 and write one PNG mask per image at its original size. Plain = that loop and
nothing else (per-file work in a helper thread, waited for); predict = `fl_client.predict.predict` (planning, refusal checks, CSV, areas,
review flags, read-ahead thread). Figures are images/s, reading and writing included; the
target is predict >= 0.9 x plain. The two are timed interleaved (one of each per repeat, the
median kept) and the ratio uses process CPU time, as benchmarks/engine.py does: on a busy shared
machine other jobs stretch wall time at random (wall figures are printed too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fl_client.predict import Options, predict  # noqa: E402
from shared.config import ModelConfig  # noqa: E402
from shared.inference import is_image_file, load_image, mask_at  # noqa: E402
from shared.site import model_from_config  # noqa: E402

POLYP = Path("/work/shared/data/polyp/kvasir_seg/images")
DEMO = ROOT / "data" / "demo" / "lung_cxr" / "montgomery" / "images"
TARGET = 0.9
BATCH = 8


def make_run_dir(folder: Path) -> Path:
    """A run dir with the demo network (config.yaml + one checkpoint)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(textwrap.dedent(f"""\
        name: bench
        run_dir: {folder}
        model: {{name: unet, in_channels: 1, channels: [16, 32, 64, 128], strides: [2, 2, 2], num_res_units: 2}}
        ---
        name: site
        image_size: 128
        channels: 1
        """))
    torch.manual_seed(0)
    torch.save({"round": 1, "state_dict": model_from_config(ModelConfig()).state_dict()},
               folder / "checkpoints" / "round_001.pt")
    return folder


def plain(files: list[Path], out: Path) -> None:
    """Read, batch, forward, resize back, write: batched inference and nothing more."""
    torch.manual_seed(0)
    net = model_from_config(ModelConfig()).eval()
    out.mkdir(parents=True, exist_ok=True)
    def read(chunk):
        return [load_image(p, 128, 1) for p in chunk]

    def write(batch, logits):
        for b, lg in zip(batch, logits):
            Image.fromarray(mask_at(lg, b.size) * np.uint8(255)).save(out / f"{b.path.stem}.png")

    # per-file work in one helper thread, waited for (no overlap): on the main thread torch's
    # intra-op threads spin on the small per-file tensors and make reading several times slower
    with ThreadPoolExecutor(max_workers=1) as helper:
        for start in range(0, len(files), BATCH):
            batch = helper.submit(read, files[start:start + BATCH]).result()
            with torch.inference_mode():
                logits = net(torch.stack([b.tensor for b in batch]))
            helper.submit(write, batch, logits).result()


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of images (default: the Kvasir-SEG polyps, else the demo X-rays)")
    parser.add_argument("--count", type=int, default=500, help="images per pass (the folder's are repeated if fewer)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes of each")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = args.images or (POLYP if POLYP.is_dir() else DEMO)
    found = sorted(p for p in source.iterdir() if is_image_file(p))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        for i in range(args.count):  # links, so that a smaller folder still gives `count` images
            original = found[i % len(found)]
            (images / f"{i:05d}{original.suffix}").symlink_to(original.resolve())
        files = sorted(images.iterdir())
        run_dir = make_run_dir(tmp / "run")
        results: dict[str, list[tuple[float, float]]] = {"plain": [], "predict": []}
        plain(files[:2 * BATCH], tmp / "warm")  # imports, allocator and oneDNN set-up, timed for neither
        predict(run_dir, images, tmp / "warm2", None, Options(batch_size=BATCH), "cpu", progress=False)
        for r in range(args.repeats):
            results["plain"].append(timed(lambda: plain(files, tmp / f"plain{r}")))
            results["predict"].append(timed(lambda: predict(run_dir, images, tmp / f"pred{r}", None,
                                                            Options(batch_size=BATCH), "cpu", progress=False)))
    n = len(files)
    print(f"\n{n} images from {source}, batch {BATCH}, {args.threads} torch thread(s), {args.repeats} interleaved repeats")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in results.items()}
    for k, (wall, cpu) in med.items():
        print(f"{k:8s} {n / cpu:7.1f} images/s (CPU time)   {n / wall:7.1f} images/s (wall)")
    ratio_cpu, ratio_wall = med["plain"][1] / med["predict"][1], med["plain"][0] / med["predict"][0]
    print(f"predict / plain: {ratio_cpu:.3f} (CPU time, target >= {TARGET})   {ratio_wall:.3f} (wall)")
    return 0 if ratio_cpu >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
