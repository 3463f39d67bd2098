"""`fl-client`: what a hospital runs.

  fl-client check --site FILE                 validate the site YAML and every data file
  fl-client local --site FILE --rounds N      try the method on this site alone, no server
  fl-client start --site FILE                 join the consortium (a Flower SuperNode)
  fl-client keygen --site FILE                make this site's key pair; print the public key
  fl-client predict --model M --images DIR --out DIR   segment new images (masks, overlays, a CSV)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared.flower_env import apply_flower_env
from shared.processes import sigterm_as_interrupt


SITE_HELP = "this site's YAML (see sites/example-site.yaml; fl-server provision writes one per site)"


def _positive_int(text: str) -> int:
    """argparse type: 0 or a negative count is a usage error, not a traceback or an empty run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give a positive number (1 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every option with a help text (tests/test_bad_input.py walks them all)."""
    parser = argparse.ArgumentParser(prog="fl-client", description="Run a hospital site of the consortium.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate the site YAML and every image and mask it points at")
    check.add_argument("--site", required=True, type=Path, help=SITE_HELP)

    local = sub.add_parser("local", help="run supervised warm-up and preference rounds on this site alone")
    local.add_argument("--site", required=True, type=Path, help=SITE_HELP)
    local.add_argument("--rounds", type=int, default=3, help="preference rounds (default 3)")
    local.add_argument("--consortium", type=Path, help="take model and training settings from this consortium YAML")
    local.add_argument("--supervised-rounds", type=int, help="warm-up rounds (default: the consortium's, else 3)")
    local.add_argument("--checkpoint", type=Path, help="start from these weights instead of a warm-up: our checkpoint, a saved "
                       "state dict or a MONAI bundle folder (models/model.pt), checked against the network")

    start = sub.add_parser("start", help="start this site's Flower SuperNode against the consortium server")
    start.add_argument("--site", required=True, type=Path, help=SITE_HELP)
    start.add_argument("--superlink", help="consortium server address HOST:PORT (default: deployment.superlink of the site YAML)")

    keygen = sub.add_parser("keygen", help="make this site's SuperNode key pair (the private key never "
                            "leaves the site) and print the public key to send to the operator")
    where = keygen.add_mutually_exclusive_group(required=True)
    where.add_argument("--site", type=Path, help="site YAML: the key goes to its deployment.private_key")
    where.add_argument("--name", help="site name, when there is no site YAML yet: writes OUT/NAME_auth")
    keygen.add_argument("--out", type=Path, help="folder for the key pair with --name (default: .)")
    keygen.add_argument("--force", action="store_true",
                        help="replace an existing private key (the operator must register the new public key)")

    predict = sub.add_parser("predict", help="segment a folder of new images with a trained model: one mask per "
                             "image (its format, its size), a CSV with areas and predicted Dice to review")
    predict.add_argument("--model", required=True, type=Path,
                         help="an exported MONAI bundle (fl-server export), a run directory (its best.pt, else its last round) "
                              "or a checkpoint file inside one")
    predict.add_argument("--images", required=True, type=Path, help="folder of PNG, JPEG or NIfTI images")
    predict.add_argument("--out", required=True, type=Path,
                         help="folder for the masks and predictions.csv (never --images or inside it)")
    predict.add_argument("--overlays", action="store_true", help="also write OUT/overlays/<image>.png, the mask outline on the image")
    predict.add_argument("--judge", type=Path,
                         help="learned_judge.pt (or the work_dir holding it) whose predicted Dice goes in the CSV")
    predict.add_argument("--site", type=Path, help=SITE_HELP + "; its work_dir's learned judge is used when there is no --judge")
    predict.add_argument("--review-below", type=float, default=0.7,
                         help="flag images whose predicted Dice is below this (default 0.7)")
    predict.add_argument("--max-fraction", type=float, default=0.9,
                         help="flag masks covering more than this share of the image (default 0.9); empty masks are always flagged")
    predict.add_argument("--batch-size", type=_positive_int, default=8, help="images per network pass (default 8)")
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the network runs (default auto)")
    predict.add_argument("--force", action="store_true", help="replace existing masks, overlays and CSV in --out")
    return parser


def main(argv=None) -> int:
    apply_flower_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from shared.config import ConfigError

    try:
        with sigterm_as_interrupt():  # from the first line: a signal before a command's own
            return _dispatch(args)  # handler is set stops it with one line too, not a traceback
    except KeyboardInterrupt:
        print(f"fl-client: {args.command} stopped", file=sys.stderr, flush=True)
        return 0 if args.command == "start" else 130  # a site stopping start is a normal end (its own handler's 0)
    except ConfigError as exc:
        print(f"fl-client: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    """The command's function; main() turns config errors and signals into one line."""
    if args.command == "check":
        return cmd_check(args)
    if args.command == "local":
        return cmd_local(args)
    if args.command == "keygen":
        from fl_client.keygen import keygen

        return keygen(args.site, args.name, args.out, args.force)
    if args.command == "predict":
        from fl_client.predict import cmd_predict

        return cmd_predict(args)
    return cmd_start(args)


def cmd_check(args) -> int:
    from shared.config import load_site, site_machine_problems

    site = load_site(args.site)  # YAML mistakes are reported before torch and MONAI load
    machine = site_machine_problems(site)  # device and work_dir: fine in the YAML, unusable here
    from shared.data import check_site_data

    problems = check_site_data(site)
    errors = machine + [p for p in problems if p.level == "error"]
    for line in machine:
        print(f"error: {line}")
    for problem in problems:
        print(f"{problem.level}: {problem}")
    if errors:
        print(f"{args.site}: {len(errors)} problem(s) found: at run time a bad file is skipped, "
              "a missing or empty folder stops the site; fix them before joining")
        return 1
    print(f"{args.site}: site '{site.name}' is ready ({len(problems)} warning(s))")
    return 0


def cmd_local(args) -> int:
    from tqdm import tqdm

    from shared.config import (ModelConfig, PreferenceConfig, QualityJudgeConfig, SupervisedConfig, load_consortium,
                               load_site, require_usable_site)
    from shared.data import load_site_data
    from shared.checkpoints import fresh_model, matching_state
    from shared.judge_training import initial_judge_state
    from shared.site import evaluate_round, load_model, train_judge_round, train_round

    site = load_site(args.site)
    require_usable_site(site)  # before the data loads, not a traceback after it
    if args.consortium:
        cfg = load_consortium(args.consortium)
        model_cfg, supervised, preference = cfg.model, cfg.supervised, cfg.preference
        quality = cfg.quality_judge or QualityJudgeConfig()
    else:
        model_cfg, supervised, preference = ModelConfig(in_channels=site.channels), SupervisedConfig(), PreferenceConfig()
        quality = QualityJudgeConfig()
    warmup = args.supervised_rounds if args.supervised_rounds is not None else supervised.rounds
    if args.checkpoint:  # our checkpoint, a state dict or a MONAI bundle, checked against the network,
        # before the data loads
        state = matching_state(args.checkpoint, load_model(model_cfg), model_cfg, "--checkpoint")
    else:
        state = fresh_model(model_cfg, f"{args.consortium}: model.pretrained_weights").state_dict()
    splits = load_site_data(site)
    for name, split in splits.items():
        print(f"{name:12s} {len(split):5d} images" + (f" ({len(split.skipped)} skipped)" if split.skipped else ""))

    def progress(steps, label):
        return tqdm(steps, desc=f"  {label}", leave=False, file=sys.stderr, disable=None)

    if args.checkpoint:
        warmup = 0
    # identity / best_k / pick: calibration Dice of the model's own mask, of the best of its K
    # proposals and of the judge's pick (what a round can gain, and how much the judge captures)
    print(f"{'round':>5} {'phase':11s} {'test dice':>9} {'hd95':>7} {'pairs':>6} {'pair_acc':>8} {'spearman':>8} "
          f"{'gain':>7} {'identity':>8} {'best_k':>7} {'pick':>7}")
    judge_state = None  # judge.kind federated: the consortium's judge, here trained by this site alone
    for r in range(1, warmup + args.rounds + 1):
        phase = "supervised" if r <= warmup else "preference"
        if phase == "preference" and site.judge.kind == "federated" and judge_state is None:
            judge_state = initial_judge_state(site.channels, quality.seed)
            try:
                for judge_round in range(1, quality.rounds + 1):
                    judge_state, _ = train_judge_round(site, model_cfg, supervised, preference, quality, judge_state,
                                                       seed=1000 * r + judge_round, splits=splits, progress=progress)
            except ValueError as err:  # e.g. fewer labelled images than quality_judge.folds
                print(f"fl-client: {site.source_file}: the quality judge cannot be trained here: {err}", file=sys.stderr)
                return 2
        state, result = train_round(site, model_cfg, phase, state, supervised, preference, seed=r,
                                    splits=splits, progress=progress, judge_state=judge_state)
        scores = evaluate_round(site, model_cfg, state, splits)
        m = result.metrics
        rel = "" if phase == "supervised" else (
            f" {int(m.get('pairs_used', 0)):6d} {m.get('rel_pair_accuracy', float('nan')):8.3f}"
            f" {m.get('rel_spearman', float('nan')):8.3f} {m.get('rel_pair_gain', float('nan')):7.3f}"
            f" {m.get('rel_dice_identity', float('nan')):8.3f} {m.get('rel_dice_best', float('nan')):7.3f}"
            f" {m.get('rel_dice_pick', float('nan')):7.3f}")
        print(f"{r:5d} {phase:11s} {scores['dice']:9.3f} {scores['hd95']:7.2f}{rel}", flush=True)
    return 0


def cmd_start(args) -> int:
    from fl_client.start import start_site
    from shared.config import load_site, require_usable_site

    require_usable_site(load_site(args.site))  # device and work_dir, before any process starts
    return start_site(args.site, args.superlink)


if __name__ == "__main__":
    sys.exit(main())
