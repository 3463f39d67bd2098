"""Provision a consortium: a CA, the SuperLink's TLS certificate, the sites' public keys.

Each site makes its own auth key pair (``fl-client keygen``) and hands over only the public
key; ``provision(public_keys=...)`` files it. ``operator_keys=True`` (``fl-server provision
--operator-keys``) is the old way, for demos and tests only: the operator makes every site's
private key and ships it, so the operator could impersonate any site.

Pure functions over ``cryptography`` (no Flower import). Layout written by ``provision``::

    out_dir/
      ca/ca.crt, ca/ca.key (0600)                 the consortium CA (keep ca.key offline)
      server/ca.crt, server.crt, server.key (0600) for ``flower-superlink --ssl-*``
      server/supernode_keys/<site>.pub            public keys to register with
                                                  ``flwr supernode register``
      sites/<site>/ca.crt                         CA the SuperNode trusts (--root-certificates)
      sites/<site>/<site>_auth.pub                the site's OpenSSH public key (from the site)
      sites/<site>/<site>_auth (0600)             only with operator_keys: EC private key
      sites/<site>/README.txt
      sites/<site>/site.yaml                      skeleton written by `fl-server provision`
                                                  (fl_server.operator), not by provision()

Flower 1.42 has no key list file: with ``--enable-supernode-auth`` the operator registers
each site's public key through the Control API (``flwr supernode register <pub>``), see
``fl_server.superlink.register_site_key``.

Re-running reuses every existing key and only adds what is missing (new sites, a site's
public key, a server certificate re-issued with the same key when a host was added or it
expired); ``force=True`` regenerates the CA and server keys (and, with operator_keys, the
site keys; a site's own public key is kept: only the site can replace it). Every file is written to a temporary name and moved
into place with ``os.replace``; if writing fails, the files and folders this call created
are removed again.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.site_keys import AUTH_CURVE, make_site_key, public_line, read_public_key  # noqa: F401
from shared.site_keys import SITE_NAME as _SITE_NAME, SITE_NAME_RULE
from shared.tls import host_in_sans, load_cert, san_hosts, signed_by

CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 365
TLS_CURVE = ec.SECP256R1
_PRIVATE = 0o600
_PUBLIC = 0o644

SITE_README = """\
Federated segmentation consortium "{consortium}": files for site "{site}"
=========================================================================

ca.crt            The consortium's CA certificate. Your SuperNode uses it to check that it
                  talks to the real consortium server (TLS). Not secret.
{key_note}

Server address(es): {hosts}

To start:
  1. Copy this folder to the machine that runs fl-client.
     {key_step}
  2. In site.yaml, replace the /path/to/... placeholders with your data folders (the server
     address, ca.crt and {site}_auth are already filled in; see the comments there).
  3. Check your configuration:   fl-client check --site site.yaml
  4. Start the client:           fl-client start --site site.yaml
     It logs what it sends each round (weights' shapes, metric names) in <work_dir>/sent.log.
"""


@dataclass(frozen=True)
class SiteFiles:
    """Paths handed to one site."""

    name: str
    dir: Path
    ca_cert: Path
    private_key: Path
    public_key: Path
    readme: Path


@dataclass(frozen=True)
class ProvisionResult:
    """Paths written (or reused) by ``provision``."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_ca_cert: Path
    server_cert: Path
    server_key: Path
    server_hosts: tuple[str, ...]
    sites: dict[str, SiteFiles]
    site_public_keys: dict[str, Path]
    written: list[Path] = field(default_factory=list)  # files (re)written by this call


# ---------------------------------------------------------------------------- keys/certs


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(
    consortium_name: str,
    valid_days: int = CA_VALID_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a self-signed CA certificate and its key (a new P-256 key unless given)."""
    key = key or ec.generate_private_key(TLS_CURVE())
    start = not_before or _now() - dt.timedelta(minutes=5)
    name = _name(f"{consortium_name} CA", consortium_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=True, crl_sign=True, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str] | tuple[str, ...],
    valid_days: int = SERVER_VALID_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a server certificate for ``hosts`` (IPs as IPAddress SANs, names as DNSName)
    signed by the CA, and its key (a new P-256 key unless given)."""
    if not hosts:
        raise ValueError("server_hosts is empty: give at least one DNS name or IP address")
    key = key or ec.generate_private_key(TLS_CURVE())
    start = not_before or _now() - dt.timedelta(minutes=5)
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    organization = org[0].value if org else "consortium"
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], str(organization)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(h) for h in hosts]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


SITE_KEY_NOTE = """\
{site}_auth       Your site's private key (EC, OpenSSH format), made HERE by
                  `fl-client keygen --site site.yaml`. It proves to the server that a
                  connection comes from your site. SECRET: it never leaves this machine.
{site}_auth.pub   Its public key: send it to the consortium operator, who runs
                  `fl-server add-site {site} --public-key {site}_auth.pub`. {status}"""
OPERATOR_KEY_NOTE = """\
{site}_auth       DEMO/TEST ONLY: a private key the operator made (--operator-keys). The
                  operator holds a copy and could act as your site; for real data make
                  your own: `fl-client keygen --site site.yaml --force`, then send the
                  new {site}_auth.pub to the operator (fl-server add-site).
{site}_auth.pub   The matching public key (registered by the operator)."""


# ---------------------------------------------------------------------------- checks


def _site_public_key(files: SiteFiles, server_pub: Path, given: bytes | None,
                     operator_keys: bool, renew: bool) -> tuple[bytes | None, bytes | None, bool]:
    """(the site's public key or None, a new operator-made private key to write or None,
    whether the operator holds the site's private key).

    The site's own key (``given``) wins; else an operator-made private key already in the
    site folder (an earlier ``operator_keys`` provision) gives it, replaced when ``renew``;
    else, with ``operator_keys``, a new pair; else the key filed earlier (``add-site``);
    else None: the site has no key yet."""
    held = files.private_key if files.private_key.exists() else None
    if given is not None:
        if held is not None and _public_of(held) != given:
            raise ValueError(f"{held}: an operator-made key that does not match the public key "
                             f"given for site {files.name!r}; delete it (the site holds its own key now)")
        return given, None, held is not None
    if held is not None and not renew:
        return _public_of(held), None, True
    if held is not None or operator_keys:
        private, public = make_site_key()
        return public, private, True
    return (server_pub.read_bytes() if server_pub.exists() else None), None, False


def _public_of(private_path: Path) -> bytes:
    key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{private_path} is not an EC private key")
    return public_line(key.public_key())


# ---------------------------------------------------------------------------- writing


class _Writer:
    """Atomic file writes that remember what they created, for rollback."""

    def __init__(self) -> None:
        self.created_files: list[Path] = []
        self.created_dirs: list[Path] = []
        self.written: list[Path] = []

    def mkdir(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self.created_dirs.append(d)

    def write(self, path: Path, data: bytes, mode: int) -> None:
        self.mkdir(path.parent)
        existed = path.exists()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if not existed:
            self.created_files.append(path)
        self.written.append(path)

    def rollback(self) -> None:
        for f in reversed(self.created_files):
            f.unlink(missing_ok=True)
        for d in reversed(self.created_dirs):
            shutil.rmtree(d, ignore_errors=True)


def _validate_inputs(consortium_name: str, site_names: list[str], hosts: list[str]) -> None:
    if not consortium_name.strip():
        raise ValueError("consortium_name is empty")
    if isinstance(site_names, str) or isinstance(hosts, str):
        raise TypeError("site_names and server_hosts must be lists of strings")
    if not hosts:
        raise ValueError("server_hosts is empty: give the DNS names and/or IPs "
                         "that SuperNodes use to reach the SuperLink")
    for name in site_names:
        if not _SITE_NAME.match(name):
            raise ValueError(
                f"site name {name!r} is not valid: {SITE_NAME_RULE}"
            )
    dupes = sorted({n for n in site_names if site_names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate site names: {dupes}")


def provision(
    out_dir: Path | str,
    consortium_name: str,
    site_names: list[str],
    server_hosts: list[str],
    force: bool = False,
    server_valid_days: int = SERVER_VALID_DAYS,
    ca_valid_days: int = CA_VALID_DAYS,
    rotate_sites: list[str] | tuple[str, ...] = (),
    include_loopback: bool = True,
    public_keys: dict[str, Path | str | bytes] | None = None,
    operator_keys: bool = False,
) -> ProvisionResult:
    """Create (or complete) the consortium's certificates and site keys in ``out_dir``.

    ``public_keys`` maps a site to the public key it made (a .pub file or its bytes); a
    site with none yet gets its folder (CA, README) but no key, and is not registered
    until ``fl-server add-site`` files its key. Only with ``operator_keys`` are missing
    site private keys made here (demo/test), new ones for ``force`` or the sites in
    ``rotate_sites`` (Flower never accepts a revoked public key again, so re-admitting a
    revoked site needs a new key). With
    ``include_loopback`` the server certificate also names 127.0.0.1 and localhost:
    ``flower-superlink`` starts its own SuperExec, which connects to the SuperLink over
    TLS on the loopback address, so that name must be in the certificate.
    Returns the paths of everything the operator and the sites need.
    """
    site_names = list(site_names)
    _validate_inputs(consortium_name, site_names, list(server_hosts))
    unknown = sorted(set(rotate_sites) - set(site_names))
    if unknown:
        raise ValueError(f"rotate_sites {unknown} are not in site_names {site_names}")
    if rotate_sites and not operator_keys:
        raise ValueError("rotate_sites needs operator_keys: a site replaces its own key "
                         "(fl-client keygen --force), then the operator runs fl-server add-site")
    given = {site: key if isinstance(key, bytes) else read_public_key(key)
             for site, key in (public_keys or {}).items()}
    unknown = sorted(set(given) - set(site_names))
    if unknown:
        raise ValueError(f"public keys for {unknown}, which are not in site_names {site_names}")
    out = Path(out_dir).resolve()
    hosts = tuple(dict.fromkeys(
        list(server_hosts) + (["127.0.0.1", "localhost"] if include_loopback else [])
    ))
    ca_crt_p, ca_key_p = out / "ca" / "ca.crt", out / "ca" / "ca.key"
    srv_dir = out / "server"
    srv_ca_p, srv_crt_p = srv_dir / "ca.crt", srv_dir / "server.crt"
    srv_key_p = srv_dir / "server.key"

    # Phase 1: decide and build everything in memory (no file touched yet).
    plan: list[tuple[Path, bytes, int]] = []

    if not force and ca_key_p.exists() and ca_crt_p.exists():
        ca_key = serialization.load_pem_private_key(ca_key_p.read_bytes(), None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_p} is not an EC private key")
        ca_cert = load_cert(ca_crt_p)
    elif not force and (ca_key_p.exists() or ca_crt_p.exists()):
        raise FileExistsError(
            f"only one of {ca_crt_p} and {ca_key_p} exists; restore the other or "
            "re-run with force=True to create a new CA (all sites then need new files)"
        )
    else:
        ca_cert, ca_key = make_ca(consortium_name, ca_valid_days)
        plan.append((ca_key_p, _pem_private_key(ca_key), _PRIVATE))
        plan.append((ca_crt_p, ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    server_key: ec.EllipticCurvePrivateKey | None = None
    if not force and srv_key_p.exists():
        loaded = serialization.load_pem_private_key(srv_key_p.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{srv_key_p} is not an EC private key")
        server_key = loaded
    reissue = force or server_key is None or not srv_crt_p.exists()
    if not reissue:
        cert = load_cert(srv_crt_p)
        sans = san_hosts(cert)
        same_key = (
            cert.public_key().public_numbers() == server_key.public_key().public_numbers()
        )
        reissue = (
            not same_key
            or cert.not_valid_after_utc < _now()
            or not signed_by(cert, ca_cert)
            or any(not host_in_sans(h, sans) for h in hosts)
        )
    if reissue:
        server_cert, new_key = make_server_cert(
            ca_cert, ca_key, hosts, server_valid_days, key=server_key
        )
        if server_key is None:
            plan.append((srv_key_p, _pem_private_key(new_key), _PRIVATE))
        plan.append(
            (srv_crt_p, server_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC)
        )
    else:
        hosts = tuple(san_hosts(load_cert(srv_crt_p)))

    sites: dict[str, SiteFiles] = {}
    site_pubs: dict[str, Path] = {}
    for site in site_names:
        d = out / "sites" / site
        files = SiteFiles(site, d, d / "ca.crt", d / f"{site}_auth", d / f"{site}_auth.pub",
                          d / "README.txt")
        sites[site] = files
        server_pub = srv_dir / "supernode_keys" / f"{site}.pub"
        public, new_private, operator_made = _site_public_key(
            files, server_pub, given.get(site), operator_keys,
            operator_keys and (force or site in rotate_sites))
        if new_private is not None:
            plan.append((files.private_key, new_private, _PRIVATE))
        files_to_write = [(files.ca_cert, ca_pem)]
        if public is not None:
            site_pubs[site] = server_pub
            files_to_write += [(files.public_key, public), (server_pub, public)]
        for path, data in files_to_write:
            if not path.exists() or path.read_bytes() != data:
                plan.append((path, data, _PUBLIC))
        note = (OPERATOR_KEY_NOTE if operator_made else SITE_KEY_NOTE).format(
            site=site, status="The operator has it on file." if public is not None
            else "Not registered yet.")
        readme = SITE_README.format(
            consortium=consortium_name, site=site, hosts=", ".join(server_hosts),
            key_note=note, key_step=(
                "(Demo keys: this folder already holds your key.)" if operator_made else
                "Make your key: fl-client keygen --site site.yaml; send "
                f"{site}_auth.pub to the operator.")
        ).encode()
        if not files.readme.exists() or files.readme.read_bytes() != readme:
            plan.append((files.readme, readme, _PUBLIC))
    if not srv_ca_p.exists() or srv_ca_p.read_bytes() != ca_pem:
        plan.append((srv_ca_p, ca_pem, _PUBLIC))

    # Phase 2: write; on failure remove what this call created.
    writer = _Writer()
    try:
        writer.mkdir(out)
        writer.mkdir(srv_dir / "supernode_keys")  # sites' public keys; empty until they send them
        for path, data, mode in plan:
            writer.write(path, data, mode)
        for key_path in [ca_key_p, srv_key_p] + [s.private_key for s in sites.values()]:
            if key_path.exists():
                os.chmod(key_path, _PRIVATE)
    except BaseException:
        writer.rollback()
        raise

    return ProvisionResult(
        out_dir=out,
        ca_cert=ca_crt_p,
        ca_key=ca_key_p,
        server_ca_cert=srv_ca_p,
        server_cert=srv_crt_p,
        server_key=srv_key_p,
        server_hosts=hosts,
        sites=sites,
        site_public_keys=site_pubs,
        written=writer.written,
    )
