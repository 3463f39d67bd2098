"""Checks on a server certificate against a CA, in one line each.

The operator runs them before starting the SuperLink (``fl-server provision``/``start``);
a site runs them before its SuperNode connects (``fl-client start``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def load_cert(path: Path | str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def san_hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName)
    )


def host_in_sans(host: str, sans: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower().rstrip(".")
        for san in sans:
            san = san.lower()
            if san == host:
                return True
            if san.startswith("*.") and host.count(".") == san.count(".") and (
                host.split(".", 1)[1] == san[2:]
            ):
                return True
        return False
    return any(same_ip(ip, san) for san in sans)


def same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, san: str) -> bool:
    try:
        return ipaddress.ip_address(san) == ip
    except ValueError:
        return False


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def server_certificate_problems(
    ca: x509.Certificate,
    server: x509.Certificate,
    host: str | None = None,
    now: dt.datetime | None = None,
    ca_label: str = "",
    server_label: str = "server certificate",
) -> list[str]:
    """``certificate_problems`` for loaded certificates; the labels name their origin
    (e.g. ``ca_label="sites/a/ca.crt"``, ``server_label="server certificate of x:9"``)."""
    now = now or _now()
    problems: list[str] = []
    ca_name = f"CA certificate {ca_label}" if ca_label else "CA certificate"
    for label, cert in ((ca_name, ca), (server_label, server)):
        if cert.not_valid_after_utc < now:
            problems.append(
                f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        elif cert.not_valid_before_utc > now:
            problems.append(
                f"{label} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
            )
    if not signed_by(server, ca):
        where = f" in {ca_label}" if ca_label else ""
        problems.append(
            f"{server_label} is not signed by the CA{where} "
            f"(certificate issuer {server.issuer.rfc4514_string()!r}, "
            f"CA subject {ca.subject.rfc4514_string()!r})"
        )
    if host is not None:
        sans = san_hosts(server)
        if not host_in_sans(host, sans):
            problems.append(f"host {host} not in certificate SANs {sans} ({server_label})")
    return problems


def certificate_problems(
    ca_crt: Path | str,
    server_crt: Path | str,
    host: str | None = None,
    now: dt.datetime | None = None,
) -> list[str]:
    """Return one-line descriptions of what is wrong with a server certificate.

    Checks that both files load, that neither certificate is expired or not yet valid,
    that the server certificate is signed by the CA in ``ca_crt``, and (when ``host``
    is given) that ``host`` is in its SANs. An empty list means no problem found.
    """
    problems: list[str] = []
    certs: list[x509.Certificate] = []
    for label, path in (("CA certificate", ca_crt), ("server certificate", server_crt)):
        try:
            certs.append(load_cert(path))
        except FileNotFoundError:
            problems.append(f"{label} file {path} does not exist")
        except ValueError as err:
            problems.append(f"{label} file {path} is not a PEM certificate ({err})")
    if problems:
        return problems
    return server_certificate_problems(
        certs[0], certs[1], host, now, ca_label=str(ca_crt),
        server_label=f"server certificate {server_crt}",
    )
