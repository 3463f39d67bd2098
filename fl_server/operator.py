"""`fl-server provision | start | revoke`: the consortium operator's commands.

``provision`` makes the CA, the SuperLink's certificate and one key per site, and a
``site.yaml`` skeleton per site. ``start`` runs one consortium run on Flower's deployment
engine: a ``flower-superlink`` with TLS and SuperNode authentication, the sites' keys
registered, our app submitted with ``flwr run``, its output streamed, and the SuperLink
stopped when the run ends or on Ctrl-C. ``revoke`` refuses a site's key.

Operator state (in the provisioned folder, ``server/``):

* ``flwr_home/``: the ``flwr`` CLI's FLWR_HOME: ``config.toml`` (one connection per
  SuperLink database, the last one started is the default), ``registered_sites.json``
  (site -> node id per connection) and ``revoked_sites.json`` (site -> its revoked public keys).

SuperLink state (in the run directory, ``superlink/``): its database (registered keys, runs),
log, and the generated app folder. A new run directory is a new database: ``start`` then
registers every key again, except revoked ones.

Registration happens before any SuperNode can reach the SuperLink: when keys must be
(un)registered, ``start`` first runs the SuperLink on a private loopback port, brings the
database up to date, stops it, and only then opens the consortium's address. Otherwise a
waiting site could connect in the second between the port opening and its key being
registered, and be refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tomllib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from fl_server import superlink as sl
from fl_server.app_dir import write_app_dir
from fl_server.provision import ProvisionResult, provision
from shared.config import ConfigError, ConsortiumConfig, load_consortium, read_yaml_text
from fl_server.refusals import watch_refusals
from shared.processes import log_length, sigterm_as_interrupt, split_address
from shared.site_keys import SiteKeyError, read_public_key, revoked_keys
from shared.tls import certificate_problems

TASK_POLL_INTERVAL = 0.2  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's default: 1 s)
STOP_TIMEOUT = 5.0  # seconds the SuperLink's group gets after SIGTERM on Ctrl-C, then SIGKILL
REVOKED_FILE = "revoked_sites.json"
SUPERLINK_DIR = "superlink"

Say = Callable[[str], None]


def _say(text: str) -> None:
    print(f"fl-server: {text}", flush=True)


# ---------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class OperatorPaths:
    """Where ``fl-server provision`` put the server's files."""

    provisioned: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    keys_dir: Path
    flwr_home: Path

    @classmethod
    def of(cls, provisioned: Path | str) -> OperatorPaths:
        root = Path(provisioned).resolve()
        server = root / "server"
        return cls(root, server / "ca.crt", server / "server.crt", server / "server.key",
                   server / "supernode_keys", server / "flwr_home")

    def missing(self) -> list[Path]:
        return [p for p in (self.ca_cert, self.server_cert, self.server_key, self.keys_dir)
                if not p.exists()]

    def site_keys(self) -> dict[str, Path]:
        """site -> its public key file, for every provisioned site."""
        return {p.stem: p for p in sorted(self.keys_dir.glob("*.pub"))}


def default_provisioned(cfg: ConsortiumConfig) -> Path:
    """``<run_dir>/../provisioned``: the default of ``--provisioned``."""
    return cfg.run_dir.parent / "provisioned"


def operator_paths(cfg: ConsortiumConfig, provisioned: Path | None) -> OperatorPaths:
    """The provisioned folder's paths; raises ConfigError if ``provision`` has not run."""
    paths = OperatorPaths.of(provisioned or default_provisioned(cfg))
    missing = paths.missing()
    if missing:
        raise ConfigError(
            f"{paths.provisioned}: not a provisioned folder ({missing[0]} is missing); run "
            f"`fl-server provision --consortium {cfg.source_file} --out {paths.provisioned}` "
            "first, or pass --provisioned"
        )
    return paths


def site_names(cfg: ConsortiumConfig) -> list[str]:
    """``server.sites``, else the ``name`` of every site YAML listed under ``sites`` (read
    without resolving its data paths, which may name another machine's folders)."""
    if cfg.server.sites:
        return list(cfg.server.sites)
    names = []
    for path in cfg.sites:
        try:
            raw = yaml.safe_load(read_yaml_text(Path(path)))  # ConfigError when not UTF-8
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cfg.source_file}: sites: cannot read {path}: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{path}: name: is required (the site's name in the consortium)")
        names.append(raw["name"])
    return names


def superlink_address(cfg: ConsortiumConfig) -> str:
    """``host:port`` the sites use: the first of ``server.hosts`` and ``server.port``."""
    host = cfg.server.hosts[0]
    return f"[{host}]:{cfg.server.port}" if ":" in host else f"{host}:{cfg.server.port}"


# ---------------------------------------------------------------------------- provision

SITE_YAML = """\
# Site "{site}" of the consortium "{consortium}": written by `fl-server provision`.
# Replace the /path/to/... placeholders under `data` with this site's folders, then
#   fl-client check --site site.yaml      (reads every image and mask, lists every problem)
#   fl-client start --site site.yaml      (joins the consortium)
# Every key is explained in sites/example-site.yaml of the fedrndpo package. Relative paths
# are relative to this file's folder. Nothing under `data` ever leaves the site.

name: {site}
work_dir: fl-work          # private state between rounds, and sent.log (what was sent)
image_size: 128            # must match the other sites
channels: {channels}                # the consortium model's input channels
device: auto               # auto, cpu or cuda

data:
  labeled:                 # a few images with expert masks (supervised training)
    images: /path/to/labeled/images
    masks: /path/to/labeled/masks
  calibration:             # images with expert masks, never trained on (judge reliability)
    images: /path/to/calibration/images
    masks: /path/to/calibration/masks
  unlabeled:               # the many images without masks
    images: /path/to/unlabeled/images
  test:                    # images with expert masks for Dice and HD95, never trained on
    images: /path/to/test/images
    masks: /path/to/test/masks
  # or one labelled folder cut into the four splits (see sites/example-site.yaml):
  # source: {{images: /path/to/all/images, masks: /path/to/all/masks}}
  # split: {{labeled: 0.2, calibration: 0.1, unlabeled: 0.5, test: 0.2}}

judge:
  kind: agreement          # agreement, uncertainty, learned or federated (the consortium's: needs quality_judge:)

deployment:
  superlink: {superlink}   # the consortium server, HOST:PORT
  ca_cert: ca.crt          # the consortium CA (in this folder)
  private_key: {site}_auth # made here by `fl-client keygen --site site.yaml`. SECRET: never leaves
  port: 9094               # local ClientApp port; another one per site on a shared machine
"""


def provision_consortium(
    consortium: Path | str, out: Path | str, force: bool = False,
    public_keys: dict[str, Path] | None = None, operator_keys: bool = False,
    extra_sites: tuple[str, ...] = (),
) -> tuple[ProvisionResult, list[Path]]:
    """``provision`` for the consortium YAML (plus ``extra_sites``), with the sites' own
    public keys, plus each site's ``site.yaml`` skeleton (written when missing, or with
    ``force``). Returns the result and the YAMLs written."""
    cfg = load_consortium(consortium)
    names = list(dict.fromkeys(site_names(cfg) + list(extra_sites)))
    try:
        result = provision(out, cfg.name, names, list(cfg.server.hosts), force=force,
                           public_keys=public_keys, operator_keys=operator_keys)
    except ValueError as err:  # a bad public key file, an unknown site: one line
        raise ConfigError(str(err)) from None
    written = []
    for site, files in result.sites.items():
        target = files.dir / "site.yaml"
        if target.exists() and not force:
            continue
        text = SITE_YAML.format(site=site, consortium=cfg.name, channels=cfg.model.in_channels,
                                superlink=superlink_address(cfg))
        tmp = target.with_name(".site.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(target)
    return result, written


def parse_public_keys(items: list[str] | None) -> dict[str, Path]:
    """``--public-key NAME=FILE`` options as {site: path}; ConfigError on a malformed one."""
    keys: dict[str, Path] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--public-key {item}: expected NAME=FILE (the site's name and "
                              "the .pub file it made with fl-client keygen)")
        keys[name] = Path(path)
    return keys


def cmd_provision(args) -> int:
    operator_keys = getattr(args, "operator_keys", False)
    result, yamls = provision_consortium(args.consortium, args.out, args.force,
                                         parse_public_keys(getattr(args, "public_key", None)),
                                         operator_keys)
    out = result.out_dir
    written = sorted(set(result.written) | set(yamls))
    for path in written:
        mode = " (private, 0600)" if path.stat().st_mode & 0o077 == 0 else ""
        _say(f"wrote {path.relative_to(out)}{mode}")
    held = [s for s in result.sites.values() if s.private_key.exists()]
    kept = [s.private_key for s in held if s.private_key not in written]
    if kept:
        _say(f"kept {len(kept)} existing site key(s) (--force replaces every key)")
    if held:
        _say(f"DEMO/TEST ONLY: you hold the private keys of {', '.join(s.name for s in held)} "
             "(--operator-keys); for real sites let each make its own (fl-client keygen)")
    waiting = [s for s in result.sites if s not in result.site_public_keys]
    if waiting:
        _say(f"no public key yet for {', '.join(waiting)}: each site runs `fl-client keygen "
             "--site site.yaml` and sends you its .pub; then `fl-server add-site NAME "
             f"--public-key FILE --consortium {args.consortium} --provisioned {out}`")
    _say(f"{len(result.sites)} site(s) in {out}/sites/: send each site its own folder "
         f"(ca.crt, site.yaml, README.txt); keep {out}/ca/ca.key offline")
    _say(f"server certificate names {', '.join(result.server_hosts)}; next: "
         f"fl-server start --consortium {args.consortium} --provisioned {out}")
    return 0


# ---------------------------------------------------------------------------- registration


def connection_name(state_dir: Path | str) -> str:
    """The ``flwr`` connection for the SuperLink whose state is in ``state_dir``: one per
    database, because node ids belong to a database."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return f"run-{digest}"


def _revoked(paths: OperatorPaths) -> dict[str, list[str]]:
    return revoked_keys(paths.flwr_home / REVOKED_FILE)


def mark_revoked(paths: OperatorPaths, site: str, public_key: str) -> None:
    """Add the key to the site's revoked keys: earlier ones stay refused after a re-admission."""
    revoked = _revoked(paths)
    if public_key not in revoked.setdefault(site, []):
        revoked[site].append(public_key)
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    tmp = paths.flwr_home / f".{REVOKED_FILE}.tmp"
    tmp.write_text(json.dumps(revoked, indent=2, sort_keys=True))
    os.replace(tmp, paths.flwr_home / REVOKED_FILE)


def site_key_index(paths: OperatorPaths) -> dict[str, tuple[str, bool]]:
    """OpenSSH key line -> (site, revoked), for naming the site behind a refused key."""
    index = {pub.read_text().strip(): (site, False) for site, pub in paths.site_keys().items()}
    index.update({key: (site, True) for site, keys in _revoked(paths).items() for key in keys})
    return index


def registration_plan(paths: OperatorPaths, connection: str) -> list[tuple[str, str]]:
    """(site, action) bringing the connection's database in line with the provisioned
    keys: ``register`` (new site, new database, rotated key) or ``unregister`` (revoked,
    or the site's old key after a rotation: then ``register`` follows)."""
    revoked = _revoked(paths)
    known = sl.registered_sites(paths.flwr_home, connection)
    plan = []
    for site, pub in paths.site_keys().items():
        key = pub.read_text().strip()
        entry = known.get(site)
        active = entry is not None and entry["status"] == "registered"
        if key in revoked.get(site, ()):
            if active and entry["public_key"] == key:
                plan.append((site, "unregister"))
            continue
        if active and entry["public_key"] == key:
            continue
        if active:
            plan.append((site, "unregister"))  # rotated key: retire the old one
        plan.append((site, "register"))
    return plan


def apply_registrations(paths: OperatorPaths, connection: str, say: Say = _say) -> None:
    """Carry out ``registration_plan`` against the running SuperLink of ``connection``."""
    revoked = _revoked(paths)
    for site, action in registration_plan(paths, connection):
        if action == "unregister":
            node = sl.revoke_site_key(site, paths.flwr_home, connection)
            say(f"site {site}: old or revoked key unregistered (node id {node})")
        else:
            node = sl.register_site_key(site, paths.site_keys()[site], paths.flwr_home, connection)
            say(f"site {site}: key registered (node id {node})")
    for site in sorted(revoked):
        pub = paths.site_keys().get(site)
        if pub is not None and pub.read_text().strip() in revoked[site]:
            say(f"site {site}: revoked, stays refused (to re-admit it: the site makes a new key "
                f"with `fl-client keygen --force`, then fl-server add-site {site} --public-key FILE)")


# ---------------------------------------------------------------------------- start


def start_consortium_superlink(
    cfg: ConsortiumConfig,
    paths: OperatorPaths,
    run_dir: Path,
    say: Say = _say,
    host: str | None = None,
    port: int | None = None,
    task_poll_interval: float = TASK_POLL_INTERVAL,
) -> tuple[sl.SuperLinkHandle, str]:
    """Check the certificates, bring the registrations up to date (on a private port
    when needed), start the SuperLink on the consortium's address and point the operator's
    ``flwr`` connection at it. Returns the handle and the connection name. ``host`` and
    ``port`` replace ``server.address``/``server.port`` (tests, benchmarks)."""
    for server_host in cfg.server.hosts:
        problems = certificate_problems(paths.ca_cert, paths.server_cert, server_host)
        if problems:
            raise sl.SuperLinkError(
                "; ".join(problems) + f" (re-run fl-server provision --out {paths.provisioned})"
            )
    state = run_dir / SUPERLINK_DIR
    connection = connection_name(state)
    if not (state / "superlink.db").exists():
        sl.forget_registrations(paths.flwr_home, connection)
    if registration_plan(paths, connection) or not (state / "superlink.db").exists():
        private = _start_link(paths, state, "127.0.0.1", None, task_poll_interval)
        try:
            sl.write_connection(paths.flwr_home, connection, private.address, paths.ca_cert)
            apply_registrations(paths, connection, say)
        finally:
            private.stop()
    else:
        apply_registrations(paths, connection, say)  # only the "stays refused" notes
    offset = log_length(state / "superlink.log")
    link = _start_link(paths, state, host or cfg.server.address, port or cfg.server.port,
                       task_poll_interval)
    watch_refusals(link.log_path, offset, link.is_running, say, lambda: site_key_index(paths))
    sl.write_connection(paths.flwr_home, connection, link.address, paths.ca_cert)
    say(f"SuperLink (TLS, site authentication) on {link.host}:{link.port}; sites connect to "
        f"{superlink_address(cfg) if port is None else link.address}; state in {state}")
    return link, connection


def _start_link(paths: OperatorPaths, state: Path, host: str, port: int | None,
                poll: float) -> sl.SuperLinkHandle:
    return sl.start_superlink(paths.ca_cert, paths.server_cert, paths.server_key, state,
                              host=host, port=port, task_poll_interval=poll)


def submit_consortium_run(
    cfg: ConsortiumConfig, paths: OperatorPaths, run_dir: Path, connection: str, resume: bool,
    extra_config: dict | None = None,
) -> int:
    """``flwr run`` our app with run config {consortium, run-dir, resume} (plus
    ``extra_config``, keys of app_dir.RUN_CONFIG_DEFAULTS); the run id."""
    app = write_app_dir(run_dir / SUPERLINK_DIR)
    run_config = {"consortium": str(Path(cfg.source_file).resolve()),
                  "run-dir": str(run_dir.resolve()), "resume": bool(resume),
                  "revoked-sites": str(paths.flwr_home / REVOKED_FILE), **(extra_config or {})}
    return sl.submit_app(app, paths.flwr_home, connection, run_config)


def cmd_start(args) -> int:
    with ExitStack() as held:  # the run dir lock, until the run and its SuperLink are over
        return _start(args, held)


def _start(args, held: ExitStack) -> int:
    from fl_server.run_dir import RunDirLocked, run_dir_lock

    cfg = load_consortium(args.consortium)
    paths = operator_paths(cfg, args.provisioned)
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    try:  # before anything reads or starts: a second run on this run dir stops here
        held.enter_context(run_dir_lock(run_dir))
    except RunDirLocked as exc:
        print(f"fl-server: {exc}", file=sys.stderr)
        return 2
    checkpoints = run_dir / "checkpoints"
    has_run = checkpoints.is_dir() and any(checkpoints.glob("round_*.pt"))
    if has_run and not args.resume:
        print(f"fl-server: {run_dir} already holds a run: pass --resume, or another --run-dir",
              file=sys.stderr)
        return 2
    if args.resume and not has_run:
        _say(f"nothing to resume in {run_dir}: starting a new run")
    if args.resume and has_run:  # before the SuperLink starts: one line, not the ServerApp's traceback
        from fl_server.run_dir import ResumeError, RunDir

        try:
            done = RunDir(run_dir).resume_point(cfg)
        except ResumeError as exc:
            print(f"fl-server: {exc}", file=sys.stderr)
            return 2
        if done is not None and done >= cfg.supervised.rounds + cfg.preference.rounds:
            _say(f"{run_dir}: the run is already finished ({done} rounds), nothing to resume; "
                 f"report: {run_dir / 'report.html'}")
            return 0

    link = None
    run_id = None
    with sigterm_as_interrupt():
        try:
            link, connection = start_consortium_superlink(cfg, paths, run_dir)
            run_id = submit_consortium_run(cfg, paths, run_dir, connection, args.resume)
            _say(f"run {run_id} submitted ({cfg.name}: {cfg.supervised.rounds} supervised + "
                 f"{cfg.preference.rounds} preference rounds, at least {cfg.federation.min_sites} "
                 f"sites) -> {run_dir}; Ctrl-C stops it (--resume continues)")
            sl.stream_run_logs(run_id, paths.flwr_home, connection, sys.stdout)
            status = sl.wait_for_run(run_id, paths.flwr_home, connection, timeout=float("inf"))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop within seconds, say how to resume
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut this short
                signal.signal(sig, signal.SIG_IGN)
            # no `flwr stop`: its CLI alone can take longer than the stop may; the ServerApp dies
            # with the SuperLink's group, and every completed round is already checkpointed
            if link is not None:
                link.stop(timeout=STOP_TIMEOUT)  # the SuperLink's group: SuperExec, ServerApp
            print(stopped_line(args, cfg, run_dir), file=sys.stderr, flush=True)
            return 130
        except (sl.SuperLinkError, sl.FlwrCliError, TimeoutError) as err:
            print(f"fl-server: {err}", file=sys.stderr)
            return 1
        finally:
            if link is not None:
                link.stop()
    _say(f"run {run_id} {status}; SuperLink stopped")
    if status != "finished:completed":
        return 1
    if (run_dir / "metrics.jsonl").exists():
        from fl_server.report import build_report

        _say(f"report: {build_report(run_dir)}; ledger: fl-server status {run_dir}")
    return 0


def stopped_line(args, cfg: ConsortiumConfig, run_dir: Path) -> str:
    """The one line `fl-server start` prints when stopped: the round reached and how to resume."""
    found = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    done = int(found[-1].stem.split("_")[1]) if found else 0
    total = cfg.supervised.rounds + cfg.preference.rounds
    command = f"fl-server start --consortium {args.consortium} --run-dir {run_dir}"
    if args.provisioned:
        command += f" --provisioned {args.provisioned}"
    if done == 0:
        return f"fl-server: stopped before round 1 of {total} completed; start again with: {command}"
    if done >= total:
        return f"fl-server: stopped after the last round ({done} of {total}); nothing to resume"
    return f"fl-server: stopped after round {done} of {total}; resume with: {command} --resume"


# ---------------------------------------------------------------------------- revoke


def _default_connection(paths: OperatorPaths) -> tuple[str, str] | None:
    path = paths.flwr_home / "config.toml"
    if not path.exists():
        return None
    superlink = tomllib.loads(path.read_text()).get("superlink", {})
    name = superlink.get("default")
    if not name or name not in superlink:
        return None
    return name, str(superlink[name]["address"])


def revoke_site(site: str, paths: OperatorPaths, say: Say = _say) -> bool:
    """Record the site's key as revoked and, if its SuperLink runs, unregister it now.
    Returns True when a running SuperLink unregistered it."""
    pub = paths.site_keys().get(site)
    if pub is None:
        raise ConfigError(f"{paths.keys_dir}: no key for site '{site}'; provisioned sites: "
                          f"{', '.join(paths.site_keys()) or 'none'}")
    key = pub.read_text().strip()
    mark_revoked(paths, site, key)
    current = _default_connection(paths)
    if current is not None:
        connection, address = current
        entry = sl.registered_sites(paths.flwr_home, connection).get(site)
        registered = entry is not None and entry["status"] == "registered" and entry["public_key"] == key
        if registered and _reachable(address):
            node = sl.revoke_site_key(site, paths.flwr_home, connection)
            say(f"site {site}: key unregistered (node id {node}); its SuperNode is refused at "
                "its next request, and at every later fl-server start")
            return True
    say(f"site {site}: revoked; no running SuperLink has its key, so it is refused from the "
        "next fl-server start on (the key is unregistered before any site can connect)")
    return False


def _reachable(address: str) -> bool:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def cmd_revoke(args) -> int:
    cfg = load_consortium(args.consortium)
    paths = operator_paths(cfg, args.provisioned)
    try:
        revoke_site(args.site, paths)
    except sl.FlwrCliError as err:
        print(f"fl-server: {err}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- add-site


def add_site(consortium: Path | str, provisioned: Path | None, site: str, public_key: Path,
             say: Say = _say) -> bool:
    """File the public key a site made (``fl-client keygen``) in the provisioned folder (a
    new site also gets its folder and site.yaml skeleton) and, when the SuperLink runs,
    register it now. Returns True when a running SuperLink registered it."""
    cfg = load_consortium(consortium)
    paths = operator_paths(cfg, provisioned)
    try:
        key = read_public_key(public_key).decode().strip()
    except SiteKeyError as err:
        raise ConfigError(str(err)) from None
    _refuse_key_of_another(paths, site, key, public_key)
    provision_consortium(consortium, paths.provisioned, public_keys={site: Path(public_key)},
                         extra_sites=(site,))
    say(f"site {site}: public key {public_key} filed as {paths.keys_dir / (site + '.pub')}; "
        f"send the site its folder {paths.provisioned / 'sites' / site} (ca.crt, site.yaml)")
    current = _default_connection(paths)
    if current is not None and _reachable(current[1]):
        apply_registrations(paths, current[0], say)
        return True
    say(f"site {site}: no SuperLink running; its key is registered at the next fl-server start")
    return False


def _refuse_key_of_another(paths: OperatorPaths, site: str, key: str, public_key: Path) -> None:
    """A key names one site: a revoked key (under any name) never comes back, and one key
    filed for two sites would make them indistinguishable to the SuperLink."""
    for other, keys in sorted(_revoked(paths).items()):
        if key in keys:
            raise ConfigError(f"{public_key}: this key of site '{other}' was revoked, and Flower never "
                              "accepts it again; the site makes a new one (fl-client keygen --force)")
    for other, pub in paths.site_keys().items():
        if other != site and pub.read_text().strip() == key:
            raise ConfigError(f"{public_key}: this key is already filed for site '{other}'; each site "
                              "makes its own (fl-client keygen)")


def cmd_add_site(args) -> int:
    try:
        add_site(args.consortium, args.provisioned, args.site, args.public_key)
    except sl.FlwrCliError as err:
        print(f"fl-server: {err}", file=sys.stderr)
        return 1
    return 0
