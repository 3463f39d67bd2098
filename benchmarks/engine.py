"""Engine benchmarks: preference step cost, proposal throughput, mining memory (prints figures; not a test).

    python benchmarks/engine.py [--images 1000] [--threads N] [--repeats R] [--device cpu]

Everything runs on the demo consortium's model (sites/demo/consortium.yaml: MONAI UNet
16-32-64-128, dropout 0.1) and the demo chest X-rays at 128 x 128, in one run:

1. RN-DPO step / supervised step, same batch (8 images; RN-DPO with 8 pairs, one per image,
   lambda_sup 0 so that the preference step is measured alone). Both are the functions the
   training loops call (`shared.training.preference_step`, `supervised_step`), in the mode the
   loops use (supervised: train mode, dropout on; preference: eval mode). The reference logits
   are cached in the pairs, as at mining; the reference never runs in a step. The two steps are
   timed interleaved (one of each per repeat) so that load from other jobs hits both alike.
2. Proposal throughput (K = 8: tta identity/hflip/vflip/hvflip + 4 MC-dropout samples, no
   thresholds, proposal batch_size 32) against 8 `plain_inference` passes (batch 32) over the
   same images: images/s of each and the ratio.
3. Peak resident memory of `mine_split` with the agreement judge (the demo consortium's
   proposals, K = 11, and mining settings) over images/4, images/2 and images unlabelled images
   (the demo images repeated), each in a fresh subprocess. Baseline = resident memory after
   importing torch, building the model and holding the images; the peak is the VmHWM during
   mining (the high-water mark is reset after setup where the kernel allows it).

Timings are medians of interleaved repeats. On the CPU the ratios use process CPU time (wall
time is printed too): other jobs on a shared machine stretch wall time at random, not the work
a step does. Set --threads explicitly: figures are only comparable at equal threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.config import ModelConfig, ProposalConfig, load_consortium, load_site  # noqa: E402
from shared.data import load_site_data  # noqa: E402
from shared.losses import supervised_loss  # noqa: E402
from shared.mining import MinedPairs  # noqa: E402
from shared.model import build_model, resolve_device, seed_everything  # noqa: E402
from shared.proposals import generate_proposals, plain_inference  # noqa: E402
from shared.training import preference_step, supervised_step  # noqa: E402

CONSORTIUM = ROOT / "sites" / "demo" / "consortium.yaml"
SITE_FILES = ("montgomery.yaml", "shenzhen_a.yaml", "shenzhen_b.yaml")

STEP_TARGET = 1.15  # RN-DPO step / supervised step, at most
PROPOSAL_TARGET = 0.85  # proposal images/s / (plain images/s / 8), at least
MEMORY_TARGET_MB = 3 * 1024  # peak resident memory of mining, below
STEP_BATCH = 8
PROPOSAL_IMAGES = 64
PROPOSAL_K8 = ProposalConfig(tta=("identity", "hflip", "vflip", "hvflip"), mc_samples=4, thresholds=(), batch_size=32)


# ----------------------------------------------------------------------------- setup


def demo_model(model_cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """The consortium's model for 1-channel images, seeded."""
    seed_everything(0)
    return build_model(model_cfg.name, in_channels=1, channels=model_cfg.channels, strides=model_cfg.strides,
                       num_res_units=model_cfg.num_res_units, dropout=model_cfg.dropout).to(device)


def demo_images(n: int, with_masks: bool = False):
    """n demo images (and masks) at 128 px: the three demo sites' images, repeated as needed."""
    images, masks = [], []
    for name in SITE_FILES:
        for split in load_site_data(load_site(ROOT / "sites" / "demo" / name)).values():
            images.append(split.images)
            masks.append(split.masks)
    images, masks = torch.cat(images), torch.cat(masks)
    index = torch.arange(n) % len(images)
    return (images[index].clone(), masks[index].clone()) if with_masks else images[index].clone()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _medians(times: dict[str, list[tuple[float, float]]], device: torch.device) -> dict[str, dict[str, float]]:
    """Median seconds per entry: wall, cpu, and `basis`, the one the figures use.

    On the CPU the basis is process CPU time: on a shared machine other jobs stretch wall time
    at random (time slicing), while the work a step does shows in its CPU time. On CUDA the
    basis is wall time (the GPU's work is not CPU time).
    """
    out = {}
    for name, pairs in times.items():
        wall = statistics.median(t[0] for t in pairs)
        cpu = statistics.median(t[1] for t in pairs)
        out[name] = {"wall": wall, "cpu": cpu, "basis": cpu if device.type == "cpu" else wall}
    return out


# ----------------------------------------------------------------------------- 1. step cost


def bench_steps(model_cfg, pref_cfg, device, repeats: int) -> dict:
    model = demo_model(model_cfg, device)
    images, masks = demo_images(STEP_BATCH, with_masks=True)
    masks = masks.float()
    # 8 pairs, one per image: chosen = ground truth, rejected = ground truth shifted 4 pixels
    chosen = masks.to(torch.uint8)
    rejected = chosen.roll(4, dims=-1)
    ref_logits = plain_inference(model, images, device)  # cached once, as mining does
    pairs = MinedPairs(
        image_index=torch.arange(STEP_BATCH),
        chosen=chosen,
        rejected=rejected,
        ref_logits=ref_logits,
        score_gap=torch.ones(STEP_BATCH),
    )
    batch = (torch.arange(STEP_BATCH), torch.arange(STEP_BATCH))
    cfg = dataclasses.replace(pref_cfg, method="rn_dpo", lambda_sup=0.0, batch_pairs=STEP_BATCH)
    sup_loss_fn = supervised_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def supervised(train_mode: bool = True):
        model.train(train_mode)
        supervised_step(model, optimizer, sup_loss_fn, images, masks, device)

    def preference():
        model.eval()
        preference_step(model, optimizer, cfg, images, batch, pairs, device)

    for _ in range(3):  # warm-up: allocator, kernels, Adam state
        supervised()
        supervised(False)
        preference()
    times = {"supervised": [], "supervised_eval": [], "rn_dpo": []}
    for _ in range(repeats):
        times["supervised"].append(_timed(supervised, device))
        times["rn_dpo"].append(_timed(preference, device))
        times["supervised_eval"].append(_timed(lambda: supervised(False), device))
    med = _medians(times, device)
    ms = {k: 1000 * v["basis"] for k, v in med.items()}
    wall_ms = {k: 1000 * v["wall"] for k, v in med.items()}
    return {"ms": ms, "wall_ms": wall_ms, "ratio": ms["rn_dpo"] / ms["supervised"],
            "ratio_eval": ms["rn_dpo"] / ms["supervised_eval"],
            "ratio_wall": wall_ms["rn_dpo"] / wall_ms["supervised"], "repeats": repeats, "beta": cfg.beta}


# ----------------------------------------------------------------------------- 2. proposals


def bench_proposals(model_cfg, device, repeats: int, n_images: int = PROPOSAL_IMAGES) -> dict:
    model = demo_model(model_cfg, device)
    images = demo_images(n_images)
    passes = len(PROPOSAL_K8.tta) + PROPOSAL_K8.mc_samples

    def proposals():
        generate_proposals(model, images, PROPOSAL_K8, device, seed=0)

    def plain():
        for _ in range(passes):
            plain_inference(model, images, device, batch_size=PROPOSAL_K8.batch_size)

    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]

    def proposals_unsampled():
        """Diagnostic: the same proposals with dropout p = 0, i.e. without the cost of drawing
        the MC-dropout masks (torch skips dropout at p = 0), to separate the engine's own
        overhead (stacking, flips, sigmoid, masks) from the sampling MC dropout needs."""
        saved = [m.p for m in dropouts]
        for m in dropouts:
            m.p = 0.0
        try:
            proposals()
        finally:
            for m, p in zip(dropouts, saved):
                m.p = p

    proposals(), plain(), proposals_unsampled()  # warm-up
    times = {"proposals": [], "plain": [], "unsampled": []}
    for _ in range(repeats):
        times["proposals"].append(_timed(proposals, device))
        times["plain"].append(_timed(plain, device))
        times["unsampled"].append(_timed(proposals_unsampled, device))
    med = _medians(times, device)
    ips = {k: n_images / v["basis"] for k, v in med.items()}  # plain: 8 full passes over the images
    wall_ips = {k: n_images / v["wall"] for k, v in med.items()}
    return {"proposal_ips": ips["proposals"], "plain_ips": ips["plain"], "unsampled_ips": ips["unsampled"],
            "ratio": ips["proposals"] / ips["plain"], "ratio_unsampled": ips["unsampled"] / ips["plain"],
            "ratio_wall": wall_ips["proposals"] / wall_ips["plain"], "wall_ips": wall_ips,
            "images": n_images, "passes": passes, "repeats": repeats}


# ----------------------------------------------------------------------------- 3. mining memory


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mining_worker(n: int, threads: int, device_name: str) -> None:
    """Run in a fresh process: mine n images, print one JSON line of memory figures."""
    torch.set_num_threads(threads)
    from shared.judges import AgreementJudge
    from shared.mining import mine_split

    after_import = _status_mb("VmRSS")
    consortium = load_consortium(CONSORTIUM)
    device = resolve_device(device_name)
    model = demo_model(consortium.model, device)
    images = demo_images(n)
    baseline = _status_mb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    pairs, stats = mine_split(model, images, AgreementJudge(), consortium.preference.mining,
                              consortium.preference.proposals, device, seed=0)
    seconds = time.perf_counter() - start
    pair_mb = sum(t.numel() * t.element_size() for t in (pairs.chosen, pairs.rejected, pairs.ref_logits)) / 2**20
    print(json.dumps({
        "images": n, "after_import_mb": after_import, "images_mb": images.numel() * images.element_size() / 2**20,
        "baseline_mb": baseline, "peak_mb": _status_mb("VmHWM"), "hwm_reset": reset, "pairs": len(pairs),
        "pairs_mb": pair_mb, "k": stats["proposals_per_image"], "seconds": seconds,
    }))


def bench_memory(sizes: list[int], threads: int, device_name: str) -> list[dict]:
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--mining-worker", str(n), "--threads", str(threads), "--device", device_name],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  mining {n:5d} images: peak {rows[-1]['peak_mb']:.0f} MB, baseline {rows[-1]['baseline_mb']:.0f} MB, "
              f"{rows[-1]['pairs']} pairs, {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def cpu_info() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {os.cpu_count()} logical CPUs ({usable} usable)"


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="largest mining size (also runs 1/4 and 1/2 of it)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed proposal repeats; the steps are timed 4x as often (default 5)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--mining-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mining_worker is not None:
        mining_worker(args.mining_worker, args.threads, args.device)
        return 0

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    consortium = load_consortium(CONSORTIUM)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}; CPU: {cpu_info()}", flush=True)

    steps = bench_steps(consortium.model, consortium.preference, device, 4 * args.repeats)
    ms = steps["ms"]
    print(f"  steps (batch {STEP_BATCH}, {steps['repeats']} repeats): supervised {ms['supervised']:.1f} ms "
          f"(eval mode {ms['supervised_eval']:.1f} ms), RN-DPO {ms['rn_dpo']:.1f} ms", flush=True)
    prop = bench_proposals(consortium.model, device, args.repeats)
    print(f"  proposals ({prop['images']} images, K = {prop['passes']}, {prop['repeats']} repeats): "
          f"{prop['proposal_ips']:.1f} images/s; {prop['passes']} plain passes: {prop['plain_ips']:.1f} images/s", flush=True)
    sizes = sorted({max(1, args.images // 4), max(1, args.images // 2), args.images})
    mem = bench_memory(sizes, args.threads, args.device)

    small, big = mem[0], mem[-1]
    over_small = small["peak_mb"] - small["baseline_mb"]
    over_big = big["peak_mb"] - big["baseline_mb"]
    growth = over_big / max(over_small, 1e-9)
    size_ratio = big["images"] / small["images"]
    rows = [
        ("RN-DPO step / supervised step", f"{steps['ratio']:.3f}", f"<= {STEP_TARGET}", steps["ratio"] <= STEP_TARGET),
        ("proposals / plain throughput (K=8)", f"{prop['ratio']:.3f}", f">= {PROPOSAL_TARGET}", prop["ratio"] >= PROPOSAL_TARGET),
        (f"mining peak RSS, {big['images']} images", f"{big['peak_mb']:.0f} MB", f"< {MEMORY_TARGET_MB} MB",
         big["peak_mb"] < MEMORY_TARGET_MB),
        (f"mining growth over baseline {small['images']}->{big['images']}", f"{growth:.2f}x",
         f"< {size_ratio:.0f}x (sub-linear)", growth < size_ratio),
    ]
    basis = "process CPU time" if device.type == "cpu" else "wall time"
    wall = steps["wall_ms"]
    print()
    print(f"Engine benchmark: torch {torch.__version__}, torch threads {torch.get_num_threads()}, device {device}")
    print(f"CPU: {cpu_info()}; python {platform.python_version()}; load average {_load_average()}")
    print(f"model: demo consortium {consortium.model.name} {list(consortium.model.channels)}, images 128x128")
    print(f"figures use {basis} (wall clock shown beside it: other jobs on a shared machine stretch it)")
    print()
    print("details")
    print(f"  steps, batch {STEP_BATCH} (RN-DPO: 8 pairs on 8 images, beta {steps['beta']}, lambda_sup 0), "
          f"median of {steps['repeats']}, interleaved:")
    print(f"    supervised (train mode, as supervised_round) {ms['supervised']:8.1f} ms   (wall {wall['supervised']:.1f} ms)")
    print(f"    supervised (eval mode, for reference)        {ms['supervised_eval']:8.1f} ms   (wall {wall['supervised_eval']:.1f} ms)")
    print(f"    RN-DPO (eval mode, as preference_round)      {ms['rn_dpo']:8.1f} ms   (wall {wall['rn_dpo']:.1f} ms)")
    print(f"    ratio RN-DPO / supervised {steps['ratio']:.3f} (wall {steps['ratio_wall']:.3f}); "
          f"against eval-mode supervised {steps['ratio_eval']:.3f}")
    print(f"  proposals: tta {list(PROPOSAL_K8.tta)} + mc_samples {PROPOSAL_K8.mc_samples}, thresholds none, "
          f"batch_size {PROPOSAL_K8.batch_size}; {prop['images']} images, median of {prop['repeats']}, interleaved:")
    print(f"    generate_proposals                 {prop['proposal_ips']:8.1f} images/s   (wall {prop['wall_ips']['proposals']:.1f})")
    print(f"    {prop['passes']} x plain_inference (batch 32)     {prop['plain_ips']:8.1f} images/s   (wall {prop['wall_ips']['plain']:.1f})")
    print(f"    ratio {prop['ratio']:.3f} (wall {prop['ratio_wall']:.3f})")
    print(f"    diagnostic, same proposals with dropout p = 0 (no MC-dropout masks drawn): {prop['unsampled_ips']:.1f} "
          f"images/s, ratio {prop['ratio_unsampled']:.3f}; the rest of the gap is drawing the dropout masks")
    print(f"  mining: agreement judge, K = {big['k']} (demo proposals), demo images repeated, fresh process each;"
          f" VmHWM reset after setup: {big['hwm_reset']}")
    print(f"    {'images':>6} {'torch+import':>12} {'images':>8} {'baseline':>9} {'peak':>8} {'over base':>9} "
          f"{'pairs':>6} {'pair MB':>8} {'seconds':>8}")
    for r in mem:
        print(f"    {r['images']:6d} {r['after_import_mb']:9.0f} MB {r['images_mb']:5.0f} MB {r['baseline_mb']:6.0f} MB "
              f"{r['peak_mb']:5.0f} MB {r['peak_mb'] - r['baseline_mb']:6.0f} MB {r['pairs']:6d} {r['pairs_mb']:8.1f} "
              f"{r['seconds']:8.1f}")
    print()
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>10}  {'target':<22} result")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>10}  {target:<22} {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
