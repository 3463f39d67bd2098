"""The run directory (DESIGN.md section 6): config, metrics.jsonl, ledger, checkpoints.

Everything a restarted server needs to resume lives here, written atomically, so a server
killed at any point resumes from its last completed round.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from shared.checkpoints import save_atomically
from shared.config import ConsortiumConfig, to_dict, to_yaml
from shared.ledger import Ledger
from shared.selection import Selection


LOCK_FILE = ".lock"
# Held while a round's checkpoint is written, so that a stop on a signal (fl-sim) waits for
# ledger.json and the checkpoint to agree instead of leaving one round ahead of the other.
SAVING = threading.Lock()


class RunDirLocked(RuntimeError):
    """Another live process runs on this run directory."""


@contextmanager
def run_dir_lock(path: Path | str) -> Iterator[Path]:
    """Hold an flock on ``<run_dir>/.lock`` (with our PID in it) for the whole run, so that two
    runs never write one run dir; the OS drops it when the process dies, so a crash never
    leaves a stale lock. Raises RunDirLocked naming the holder's PID."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLocked(f"{path} is in use by another run (PID {_holder(lock)}, see {lock}); "
                           "wait for it to end, stop it, or choose another --run-dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        os.close(fd)  # releases the lock; the file stays (its PID is only read under a lock)


def _holder(lock: Path) -> str:
    """The PID the holder wrote (it may be between locking and writing for a moment)."""
    for _ in range(20):
        try:
            text = lock.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    return "unknown"


# top-level settings added after runs were made with this code: left out of the fingerprint while
# at their default, so that a run made before a setting existed still resumes
ADDED_LATER = {"quality_judge": None}
# options added later inside a section, likewise: (section, option) -> the value that behaves as before
OPTIONS_ADDED_LATER = {("quality_judge", "rank_weight"): 0.0, ("aggregation", "excluded_steps"): "preference",
                       ("aggregation", "bound_counts"): "pairs"}


def config_hash(cfg: ConsortiumConfig) -> str:
    """A fingerprint of everything that decides a run's result (the run dir itself excluded)."""
    settings = to_dict(cfg)
    settings.pop("run_dir", None)
    for key, default in ADDED_LATER.items():
        if settings.get(key) == default:
            settings.pop(key, None)
    for (section, key), default in OPTIONS_ADDED_LATER.items():
        if isinstance(settings.get(section), dict) and settings[section].get(key, default) == default:
            settings[section].pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.ledger = self.path / "ledger.json"
        self.checkpoints = self.path / "checkpoints"
        self.overlays = self.path / "overlays"

    def start(self, cfg: ConsortiumConfig, site_configs: list | None = None) -> None:
        """Create a fresh run directory; refuse to mix two runs in one folder."""
        if self.latest_checkpoint() is not None:
            raise FileExistsError(
                f"{self.path} already holds a run (checkpoints found): resume it with --resume "
                "or choose another --run-dir"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.best.unlink(missing_ok=True)  # left by a run whose checkpoints were deleted: not this run's
        text = to_yaml(cfg)
        if site_configs:
            text += "\n# sites, as resolved\n---\n" + "---\n".join(to_yaml(s) for s in site_configs)
        _atomic_write(self.path / "config.yaml", text)
        self.metrics.write_text("")

    def append(self, line: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def save_round(self, round_number: int, state: dict, ledger: Ledger, cfg_hash: str,
                   selection: Selection | None = None, calib_dice: float | None = None,
                   judge_state: dict | None = None) -> None:
        """Checkpoint the global model, ledger, model selection and the consortium's quality judge
        (None: none trained yet) after a completed round; the
        round's checkpoint first, then best.pt when the round is the new best (so a stop between
        the two leaves best.pt one best behind, which `resume_selection` repairs)."""
        selection = selection or Selection()
        with SAVING:
            ledger.rounds_completed = round_number
            ledger.save(self.ledger)
            payload = {"round": round_number, "state_dict": state, "ledger": ledger.to_dict(),
                       "config_hash": cfg_hash, "selection": selection.to_dict(), "calib_dice": calib_dice,
                       "judge_state": judge_state}
            save_atomically(payload, self.checkpoint(round_number))
            if selection.best_round == round_number:
                save_atomically(payload, self.best)

    @property
    def best(self) -> Path:
        """The round with the best consortium calibration Dice: a round checkpoint's payload (in the
        run dir itself, beside checkpoints/, so that no glob of round checkpoints meets it)."""
        return self.path / "best.pt"

    def resume_selection(self, done: int, state: dict) -> tuple[Selection, dict]:
        """The model selection after round `done`, and the weights the next round starts from:
        `state` (round `done`'s), or the best round's when round `done` was rolled back. Rewrites
        best.pt from its round's checkpoint when a stop came between the two writes."""
        payload = torch.load(self.checkpoint(done), map_location="cpu", weights_only=True)
        selection = Selection.from_dict(payload.get("selection"))
        if selection.best_round is None:
            return selection, state
        best = torch.load(self.checkpoint(selection.best_round), map_location="cpu", weights_only=True)
        saved = torch.load(self.best, map_location="cpu", weights_only=True) if self.best.exists() else {}
        if saved.get("round") != selection.best_round:
            with SAVING:
                save_atomically(best, self.best)
        return selection, best["state_dict"] if selection.rolled_back else state

    def start_state(self, round_number: int) -> dict:
        """The weights the round after `round_number` started from (its best round's after a rollback)."""
        payload = torch.load(self.checkpoint(round_number), map_location="cpu", weights_only=True)
        return self.resume_selection(round_number, payload["state_dict"])[1]

    def judge_state(self, round_number: int) -> dict | None:
        """The consortium's quality judge as round `round_number` left it (None: not trained yet)."""
        payload = torch.load(self.checkpoint(round_number), map_location="cpu", weights_only=True)
        return payload.get("judge_state")

    def checkpoint(self, round_number: int) -> Path:
        return self.checkpoints / f"round_{round_number:03d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("round_*.pt")) if self.checkpoints.exists() else []
        return found[-1] if found else None

    def resume(self, cfg_hash: str) -> tuple[int, dict, Ledger]:
        """The last completed round, its global weights and ledger; metrics after it are dropped."""
        latest = self.latest_checkpoint()
        if latest is None:
            raise FileNotFoundError(f"{self.path}: no checkpoint to resume from")
        payload = torch.load(latest, map_location="cpu", weights_only=True)
        if payload["config_hash"] != cfg_hash:
            raise ValueError(
                f"{latest}: this run was made with a different consortium config "
                f"(hash {payload['config_hash']}, now {cfg_hash}); resume with the same config or start a new run dir"
            )
        done = int(payload["round"])
        self._drop_metrics_after(done)
        return done, payload["state_dict"], Ledger.from_dict(payload["ledger"])

    def resume_point(self, cfg: ConsortiumConfig) -> int | None:
        """The round a `--resume` would continue after (None: no checkpoint), checked before any
        process starts; raises ResumeError, one line naming the run dir and what changed, when
        the last checkpoint was made with another config (`resume` would refuse it mid-start)."""
        latest = self.latest_checkpoint()
        if latest is None:
            return None
        payload = torch.load(latest, map_location="cpu", weights_only=True)
        if payload["config_hash"] != config_hash(cfg):
            changed = _changed_keys(self.path / "config.yaml", cfg)
            what = f" ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} changed)" if changed else ""
            raise ResumeError(
                f"{self.path}: its last checkpoint ({latest.name}) was made with a different consortium "
                f"config{what}; resume with the config it was made with, or start a new --run-dir")
        return int(payload["round"])

    def _drop_metrics_after(self, round_number: int) -> None:
        if not self.metrics.exists():
            return
        kept = []
        for raw in self.metrics.read_text().splitlines():
            try:
                if json.loads(raw)["round"] <= round_number:
                    kept.append(raw)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short when the server was killed
        _atomic_write(self.metrics, "".join(line + "\n" for line in kept))


class ResumeError(ValueError):
    """Why a run dir cannot be resumed with this config, in one line."""


def _changed_keys(saved: Path, cfg: ConsortiumConfig) -> list[str]:
    """Dotted keys whose value differs between the run's config.yaml and `cfg` (the hash says
    only *that* it differs); [] when config.yaml is missing or unreadable."""
    try:
        old = next(iter(yaml.safe_load_all(saved.read_text(encoding="utf-8"))), None)
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []

    def diff(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in sorted(set(a) | set(b), key=str)
                    for k in diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))]
        return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]

    new = to_dict(cfg)
    old.pop("run_dir", None), new.pop("run_dir", None)
    return diff(old, new, "")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
