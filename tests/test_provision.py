"""Tests for fl_server.provision: files, permissions, reuse, and certificate checks."""

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fl_server.provision import make_ca, make_server_cert, provision
from shared.tls import certificate_problems

SITES = ["hospital-a", "hospital_b"]
HOSTS = ["fl.example.org", "10.1.2.3"]


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def prov(tmp_path):
    """The demo/test layout: the operator makes the sites' keys (operator_keys)."""
    return provision(tmp_path / "out", "Demo Consortium", SITES, HOSTS, operator_keys=True)


def test_files_exist_and_private_keys_are_0600(prov):
    assert prov.ca_cert.is_file() and prov.server_cert.is_file()
    assert prov.server_ca_cert.read_bytes() == prov.ca_cert.read_bytes()
    private = [prov.ca_key, prov.server_key] + [s.private_key for s in prov.sites.values()]
    for path in private:
        assert _mode(path) == 0o600, path
    for site in SITES:
        files = prov.sites[site]
        assert files.dir == prov.out_dir / "sites" / site
        assert files.private_key.name == f"{site}_auth"
        assert files.public_key.name == f"{site}_auth.pub"
        assert files.ca_cert.read_bytes() == prov.ca_cert.read_bytes()
        readme = files.readme.read_text()
        assert "fl-client start --site site.yaml" in readme and f"{site}_auth" in readme
        assert prov.site_public_keys[site].read_bytes() == files.public_key.read_bytes()
    assert not list(prov.out_dir.rglob("*.tmp"))


def test_server_cert_is_signed_by_ca_and_has_sans(prov):
    ca = x509.load_pem_x509_certificate(prov.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(prov.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.1.2.3") in ips
    # loopback is added: the SuperLink's own SuperExec connects to 127.0.0.1 over TLS
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert isinstance(server.signature_hash_algorithm, hashes.SHA256)
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert days == 365 and ca_days == 3650
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert certificate_problems(prov.ca_cert, prov.server_cert, "10.1.2.3") == []
    assert certificate_problems(prov.ca_cert, prov.server_cert, "fl.example.org") == []


def test_site_keys_are_ec_openssh(prov):
    for files in prov.sites.values():
        assert files.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
        key = serialization.load_ssh_private_key(files.private_key.read_bytes(), None)
        pub = serialization.load_ssh_public_key(files.public_key.read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert files.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_rerun_keeps_keys_and_force_replaces_them(tmp_path, prov):
    before = {p: p.read_bytes() for p in prov.out_dir.rglob("*") if p.is_file()}
    again = provision(tmp_path / "out", "Demo Consortium", SITES, HOSTS, operator_keys=True)
    assert again.written == []
    assert {p: p.read_bytes() for p in before} == before

    forced = provision(tmp_path / "out", "Demo Consortium", SITES, HOSTS, force=True, operator_keys=True)
    for path in [forced.ca_key, forced.server_key, forced.ca_cert, forced.server_cert] + [
        s.private_key for s in forced.sites.values()
    ]:
        assert path.read_bytes() != before[path], path
        assert path in forced.written
    assert certificate_problems(forced.ca_cert, forced.server_cert, "10.1.2.3") == []
    for files in forced.sites.values():  # sites get the new CA
        assert files.ca_cert.read_bytes() == forced.ca_cert.read_bytes()


def test_new_site_added_later_keeps_old_ones(tmp_path, prov):
    old = {s: prov.sites[s].private_key.read_bytes() for s in SITES}
    more = provision(tmp_path / "out", "Demo Consortium", SITES + ["clinic-c"], HOSTS, operator_keys=True)
    assert {s: more.sites[s].private_key.read_bytes() for s in SITES} == old
    assert more.sites["clinic-c"].private_key.is_file()
    assert _mode(more.sites["clinic-c"].private_key) == 0o600
    assert set(more.written) == {
        more.sites["clinic-c"].private_key, more.sites["clinic-c"].public_key,
        more.sites["clinic-c"].ca_cert, more.sites["clinic-c"].readme,
        more.site_public_keys["clinic-c"],
    }


def test_rotate_one_site_and_add_host_keeps_server_key(tmp_path, prov):
    old_a = prov.sites["hospital-a"].private_key.read_bytes()
    old_b = prov.sites["hospital_b"].private_key.read_bytes()
    server_key = prov.server_key.read_bytes()
    res = provision(tmp_path / "out", "Demo Consortium", SITES, HOSTS + ["10.9.9.9"],
                    rotate_sites=["hospital_b"], operator_keys=True)
    assert res.sites["hospital-a"].private_key.read_bytes() == old_a
    assert res.sites["hospital_b"].private_key.read_bytes() != old_b
    assert res.server_key.read_bytes() == server_key  # cert re-issued, key kept
    assert certificate_problems(res.ca_cert, res.server_cert, "10.9.9.9") == []


@pytest.mark.parametrize(
    "sites, hosts, match",
    [
        (["ok", "bad/name"], ["h"], "not valid"),
        (["a", "a"], ["h"], "duplicate"),
        (["a"], [], "server_hosts is empty"),
    ],
)
def test_bad_inputs_are_refused_and_leave_nothing(tmp_path, sites, hosts, match):
    with pytest.raises(ValueError, match=match):
        provision(tmp_path / "out", "Demo", sites, hosts)
    assert not (tmp_path / "out").exists()


def test_failed_write_on_fresh_dir_removes_everything(tmp_path, monkeypatch):
    import fl_server.provision as provision_module

    real_write = provision_module._Writer.write
    calls = {"n": 0}

    def failing_write(self, path, data, mode):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError("disk full")
        real_write(self, path, data, mode)

    monkeypatch.setattr(provision_module._Writer, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        provision(tmp_path / "out", "Demo", SITES, HOSTS)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- certificate_problems


def test_certificate_problems_expired(tmp_path):
    ca, ca_key = make_ca("Demo")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    server, _ = make_server_cert(ca, ca_key, ["127.0.0.1"], valid_days=10, not_before=past)
    (tmp_path / "ca.crt").write_bytes(_pem(ca))
    (tmp_path / "server.crt").write_bytes(_pem(server))
    problems = certificate_problems(tmp_path / "ca.crt", tmp_path / "server.crt", "127.0.0.1")
    assert len(problems) == 1
    expiry = (past + dt.timedelta(days=10)).strftime("%Y-%m-%d")
    assert "server certificate" in problems[0] and f"expired on {expiry}" in problems[0]


def test_certificate_problems_other_ca(tmp_path):
    ca, _ = make_ca("Demo")
    other, other_key = make_ca("Other")
    server, _ = make_server_cert(other, other_key, ["127.0.0.1"])
    (tmp_path / "ca.crt").write_bytes(_pem(ca))
    (tmp_path / "server.crt").write_bytes(_pem(server))
    problems = certificate_problems(tmp_path / "ca.crt", tmp_path / "server.crt", "127.0.0.1")
    assert len(problems) == 1
    assert f"not signed by the CA in {tmp_path / 'ca.crt'}" in problems[0]


def test_certificate_problems_missing_san(tmp_path, prov):
    problems = certificate_problems(prov.ca_cert, prov.server_cert, "10.0.0.7")
    assert len(problems) == 1
    assert problems[0].startswith("host 10.0.0.7 not in certificate SANs [")
    assert "'fl.example.org'" in problems[0]
    assert certificate_problems(prov.ca_cert, prov.server_cert, "other.example.org")


def test_certificate_problems_missing_file(tmp_path, prov):
    problems = certificate_problems(tmp_path / "nope.crt", prov.server_cert)
    assert problems == [f"CA certificate file {tmp_path / 'nope.crt'} does not exist"]


# ---------------------------------------------------------------- sites own their keys


def _keygen(*args):
    from fl_client.cli import main

    return main(["keygen", *map(str, args)])


def test_keygen_makes_a_private_key_only_the_site_holds(tmp_path, capsys):
    assert _keygen("--name", "hospital-a", "--out", tmp_path / "keys") == 0
    private, public = tmp_path / "keys" / "hospital-a_auth", tmp_path / "keys" / "hospital-a_auth.pub"
    assert _mode(private) == 0o600 and _mode(public) == 0o644
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    out = capsys.readouterr().out
    assert public.read_text().strip() in out and str(public) in out
    assert "fl-server add-site hospital-a --public-key hospital-a_auth.pub" in out

    before = private.read_bytes()
    assert _keygen("--name", "hospital-a", "--out", tmp_path / "keys") == 2  # never overwritten
    assert "a key already exists" in capsys.readouterr().err and private.read_bytes() == before
    assert _keygen("--name", "hospital-a", "--out", tmp_path / "keys", "--force") == 0
    assert private.read_bytes() != before


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65])
def test_keygen_refuses_a_name_that_is_not_a_site_name(tmp_path, capsys, name):
    (tmp_path / "kg").mkdir()
    assert _keygen("--name", name, "--out", tmp_path / "kg") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a valid site name" in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_provision_files_site_public_keys_and_holds_no_private_key(tmp_path):
    from shared.site_keys import write_key_pair

    _, pub, line = write_key_pair(tmp_path / "site-a" / "hospital-a_auth")
    res = provision(tmp_path / "out", "Demo", SITES, HOSTS, public_keys={"hospital-a": pub})
    assert not list((res.out_dir / "sites").rglob("*_auth"))  # no site private key anywhere
    assert res.site_public_keys == {"hospital-a": res.out_dir / "server" / "supernode_keys" / "hospital-a.pub"}
    assert res.site_public_keys["hospital-a"].read_bytes() == line
    assert "fl-client keygen --site site.yaml" in res.sites["hospital_b"].readme.read_text()
    # hospital_b sends its key later (what fl-server add-site does): nothing else changes
    _, pub_b, line_b = write_key_pair(tmp_path / "site-b" / "hospital_b_auth")
    more = provision(tmp_path / "out", "Demo", SITES, HOSTS, public_keys={"hospital_b": pub_b})
    assert more.site_public_keys["hospital_b"].read_bytes() == line_b
    assert more.site_public_keys["hospital-a"].read_bytes() == line  # kept without being given again
    assert set(more.written) == {more.sites["hospital_b"].public_key, more.site_public_keys["hospital_b"],
                                 more.sites["hospital_b"].readme}


@pytest.mark.parametrize("content, problem", [
    (b"-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n", "this is a PRIVATE key"),
    (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJm1xmHpHDtN8Z+2mFHXJoZcV5FvLj3mK0wDQxJQdJf\n", "NIST curve"),
    (b"hello\n", "not an OpenSSH public key"),
])
def test_a_bad_public_key_is_one_line_naming_the_file(tmp_path, content, problem):
    bad = tmp_path / "bad.pub"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as err:
        provision(tmp_path / "out", "Demo", SITES, HOSTS, public_keys={"hospital-a": bad})
    assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_add_site_files_a_new_site_and_refuses_a_revoked_key(tmp_path):
    from fl_server import operator as op
    from shared.config import ConfigError
    from shared.site_keys import write_key_pair

    consortium = tmp_path / "consortium.yaml"
    consortium.write_text(f"name: Demo\nrun_dir: {tmp_path / 'run'}\n"
                          "server: {sites: [hospital-a], hosts: [127.0.0.1]}\n")
    op.provision_consortium(consortium, tmp_path / "prov")
    paths = op.OperatorPaths.of(tmp_path / "prov")
    assert paths.site_keys() == {}  # nobody is registered before sending a key
    said = []
    _, pub, line = write_key_pair(tmp_path / "clinic" / "clinic-c_auth")
    assert op.add_site(consortium, tmp_path / "prov", "clinic-c", pub, say=said.append) is False
    assert paths.site_keys()["clinic-c"].read_bytes() == line
    assert (tmp_path / "prov" / "sites" / "clinic-c" / "site.yaml").is_file()
    assert "registered at the next fl-server start" in said[-1]
    op.mark_revoked(paths, "clinic-c", line.decode().strip())
    with pytest.raises(ConfigError, match="was revoked, and Flower never accepts it again"):
        op.add_site(consortium, tmp_path / "prov", "clinic-c", pub, say=said.append)
    with pytest.raises(ConfigError, match="key of site 'clinic-c' was revoked") as err:
        op.add_site(consortium, tmp_path / "prov", "clinic-d", pub, say=said.append)  # under any name
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="expected NAME=FILE"):
        op.parse_public_keys(["clinic-c"])


def test_add_site_refuses_a_key_filed_for_another_site(tmp_path):
    from fl_server import operator as op
    from shared.config import ConfigError
    from shared.site_keys import write_key_pair

    consortium = tmp_path / "consortium.yaml"
    consortium.write_text(f"name: Demo\nrun_dir: {tmp_path / 'run'}\n"
                          "server: {sites: [hospital-a], hosts: [127.0.0.1]}\n")
    op.provision_consortium(consortium, tmp_path / "prov")
    _, pub, _ = write_key_pair(tmp_path / "keys" / "hospital-a_auth")
    op.add_site(consortium, tmp_path / "prov", "hospital-a", pub, say=lambda _: None)
    op.add_site(consortium, tmp_path / "prov", "hospital-a", pub, say=lambda _: None)  # again: fine
    with pytest.raises(ConfigError, match="already filed for site 'hospital-a'") as err:
        op.add_site(consortium, tmp_path / "prov", "hospital-b", pub, say=lambda _: None)
    assert "\n" not in str(err.value)
    assert "hospital-b" not in op.OperatorPaths.of(tmp_path / "prov").site_keys()


def test_operator_help_says_what_revoke_and_provision_do():
    """revoke acts at once (README: "Revocation bites at once"); sites make their own keys."""
    from fl_server.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    revoke = sub["revoke"].format_help()
    assert "at its next connection" not in revoke and "discards its pending update" in revoke
    assert "next request" in " ".join(revoke.split())
    out = next(a for a in sub["provision"]._actions if a.dest == "out").help
    assert "(its key" not in out and "fl-client keygen" in out
