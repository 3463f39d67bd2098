"""One console line per connection the SuperLink refused, from its log (``superlink.log``).

What Flower 1.42's SuperLink logs (provoked on loopback, tests/test_deployment.py):

* a key never registered, or revoked, at activation: an ERROR line
  ``[/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public
  key: b'-----BEGIN PUBLIC KEY-----\\n...', exception: No SuperNode found ...`` followed by
  uvicorn's access line ``<ip>:<port> - "POST /v1/fleet/activate-node HTTP/1.1" 412``; the
  key is matched against the provisioned and revoked keys to name the site;
* a SuperNode whose key was unregistered while it was connected: access lines with status
  401 on its next ``/v1/fleet/...`` requests;
* a registered key whose node the SuperLink still counts as online (a restart within two
  heartbeats of the site's last connection): the same ERROR line ending ``SuperNode with node
  ID ... could not be activated.`` and the 412 line; ``fl-client start`` retries it;
* a client that does not trust the server's certificate (wrong CA), or that speaks plain
  HTTP to the TLS port: NOTHING. The TLS handshake fails inside uvicorn's event loop,
  which drops the connection silently (also with PYTHONASYNCIODEBUG=1). Those refusals
  are visible only at the site (``fl-client start`` names them in one line).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization

from shared.processes import strip_ansi
from shared.site_keys import public_line

_UNKNOWN_KEY = re.compile(r"ApiError:2004\].*?b'(-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----)")
_ACCESS = re.compile(r'(\S+):\d+ - "(?:GET|POST) (/v1/fleet/[\w-]+) HTTP/[\d.]+" (\d{3})')

KeyIndex = Callable[[], dict[str, tuple[str, bool]]]  # OpenSSH key line -> (site, revoked)


def _ssh_line(pem_escaped: str) -> str | None:
    try:
        key = serialization.load_pem_public_key(pem_escaped.replace("\\n", "\n").encode())
        return public_line(key).decode().strip()  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return None


class RefusalReader:
    """Turns SuperLink log lines into refusal lines (``feed`` one line at a time)."""

    def __init__(self, keys: KeyIndex) -> None:
        self.keys = keys
        self.pending: str | None = None  # the reason of an activation refused, awaiting its IP

    def feed(self, line: str) -> str | None:
        line = strip_ansi(line)
        found = _UNKNOWN_KEY.search(line)
        if found:
            self.pending = self._why(_ssh_line(found.group(1)), still_online="could not be activated" in line)
            return None
        access = _ACCESS.search(line)
        if not access:
            return None
        ip, path, code = access.groups()
        if path.endswith("activate-node") and code == "412":
            reason, self.pending = self.pending or "unregistered SuperNode key", None
            return f"refused: {reason} from {ip}"
        if code == "401" and not path.endswith("deactivate-node"):
            return (f"refused: {path} from {ip}: its SuperNode key was unregistered while it was "
                    "connected (revoked)")
        return None

    def _why(self, key: str | None, still_online: bool = False) -> str:
        site, revoked = self.keys().get(key or "", (None, False))
        if still_online and site is not None and not revoked:  # registered, but its node is "online"
            return (f"site {site} reconnected while this SuperLink still counts its previous connection as "
                    "online (until two heartbeats are missed, 60 s); its fl-client retries")
        if site is None:
            return ("unregistered SuperNode key (no site has it; a site's key is filed with "
                    "fl-server add-site)")
        if revoked:
            return f"revoked key of site {site}"
        return f"key of site {site} is filed but not registered with this SuperLink"


def watch_refusals(log_path: Path, offset: int, running: Callable[[], bool],
                   say: Callable[[str], None], keys: KeyIndex, poll: float = 0.5) -> threading.Thread:
    """Follow ``log_path`` from ``offset`` in a daemon thread, saying one line per refusal,
    until ``running()`` is false (the SuperLink stopped)."""
    reader = RefusalReader(keys)

    def follow() -> None:
        position, rest = offset, b""
        while True:
            alive = running()
            try:
                with open(log_path, "rb") as log:
                    log.seek(position)
                    chunk = log.read()
            except OSError:
                chunk = b""
            position += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            for raw in lines:
                text = reader.feed(raw.decode(errors="replace"))
                if text:
                    say(text)
            if not alive:
                return
            time.sleep(poll)

    thread = threading.Thread(target=follow, name="superlink-refusals", daemon=True)
    thread.start()
    return thread
