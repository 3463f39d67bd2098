"""A site's SuperNode authentication key pair: made at the site, only the public half leaves.

Both sides need this (``fl-client keygen`` makes the pair, ``fl-server provision`` and
``fl-server add-site`` check the public key a site hands over), so it lives in ``shared``.
Flower's ``flwr supernode register`` takes an OpenSSH EC public key on a NIST curve
(``ecdsa-sha2-nistp384 AAAA...``); the SuperNode reads the OpenSSH private key.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

AUTH_CURVE = ec.SECP384R1  # Flower's docs use P-384 for SuperNode auth keys
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts
# A site name becomes a file and folder name (NAME_auth, sites/NAME/): no separators, no "..".
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SITE_NAME_RULE = "use 1-64 letters, digits, '_', '-', '.', starting with a letter or digit"


class SiteKeyError(ValueError):
    """A key file that cannot be used; the message is one line naming the file."""


def make_site_key() -> tuple[bytes, bytes]:
    """Return (OpenSSH private key, OpenSSH public key line) for a new EC P-384 auth key."""
    key = ec.generate_private_key(AUTH_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return private, public_line(key.public_key())


def public_line(key: ec.EllipticCurvePublicKey) -> bytes:
    """The OpenSSH public key line (with a newline), as ``flwr supernode register`` reads it."""
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH) + b"\n"


def read_public_key(path: Path | str) -> bytes:
    """The OpenSSH public key line in ``path``, checked as Flower will check it; raises
    SiteKeyError (one line) for a missing file, a private key, or a non-EC/non-NIST key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SiteKeyError(f"{path}: cannot read the public key ({err.strerror or err})") from None
    if b"PRIVATE KEY" in data:
        raise SiteKeyError(f"{path}: this is a PRIVATE key; the site must keep it and send only "
                        f"its .pub file")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SiteKeyError(f"{path}: not an OpenSSH public key ({err}); make one with "
                        "`fl-client keygen`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise SiteKeyError(f"{path}: Flower needs an EC key on a NIST curve (P-256/384/521); make "
                        "one with `fl-client keygen`")
    return public_line(key)


def write_key_pair(private_path: Path | str, force: bool = False) -> tuple[Path, Path, bytes]:
    """Make a key pair at ``private_path`` (mode 0600) and ``<private_path>.pub``; returns
    (private path, public path, public line). Refuses (FileExistsError, one line) to replace
    an existing private key unless ``force``: a registered key lost by mistake cannot be
    recovered, and a revoked one can never be registered again."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and not force:
        raise FileExistsError(f"{private_path}: a key already exists; keep it (its public key "
                              f"is {public_path}), or pass --force to replace it (the operator "
                              "must then register the new public key)")
    private, public = make_site_key()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return private_path, public_path, public


def revoked_keys(path: Path | str) -> dict[str, list[str]]:
    """site -> every public key of it ever revoked, from revoked_sites.json (``fl-server
    revoke``; an older file holds one key per site). Kept per key, not per site: a site
    re-admitted with a new key is no longer revoked, and its old key stays refused.
    Raises OSError/ValueError for an unreadable file."""
    path = Path(path)
    raw = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected {{site: [revoked public keys]}}")
    return {str(site): [keys] if isinstance(keys, str) else [str(k) for k in keys]
            for site, keys in raw.items()}
