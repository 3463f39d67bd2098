"""End-to-end: real flower-superlink (TLS + SuperNode auth) and flower-supernodes on
127.0.0.1, a throwaway Flower app submitted with `flwr run`, and the refusal paths
(unregistered key, wrong CA, revoked key). About 40 s on 2 cores."""

import datetime as dt
import json
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives import serialization

from fl_client.flower_speedups import FORK_MARKER
from fl_client.supernode import (
    SuperLinkConnectionError,
    SuperNodeError,
    check_superlink,
    start_supernode,
    wait_for_superlink,
)
from fl_server import superlink as sl
from fl_server.provision import make_ca, make_server_cert, provision

CONN = "consortium"
POLL = 0.2  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL for every SuperExec

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "echoapp"
version = "1.0.0"
description = "Deployment transport test app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedrndpo"

[tool.flwr.app.components]
serverapp = "echo_app:server_app"
clientapp = "echo_app:client_app"

[tool.flwr.app.config]
out-file = ""
expected-nodes = 2
"""

APP_MODULE = '''\
"""ServerApp sends one query to every node; ClientApp answers with its site name."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["expected-nodes"])
    deadline = time.time() + 30
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < want and time.time() < deadline:
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    messages = [
        Message(RecordDict({"config": ConfigRecord({"round": 1})}),
                dst_node_id=node_id, message_type="query")
        for node_id in node_ids
    ]
    start = time.time()
    replies = grid.send_and_receive(messages, timeout=60)
    out = {"round_s": time.time() - start, "sites": {}, "errors": []}
    for reply in replies:
        if reply.has_error():
            out["errors"].append(str(reply.error))
            continue
        site = str(reply.content["info"]["site"])
        out["sites"][site] = {
            "node_id": reply.metadata.src_node_id,
            "num-examples": reply.content["metrics"]["num-examples"],
        }
    with open(context.run_config["out-file"], "w") as fh:
        json.dump(out, fh)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    site = str(context.node_config["site"])
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": len(site)}),
        "info": ConfigRecord({"site": site}),
    })
    return Message(content, reply_to=msg)
'''


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Provisioned consortium + running SuperLink + two registered SuperNodes."""
    root = tmp_path_factory.mktemp("deploy")
    prov = provision(root / "prov", "Test Consortium", ["alpha", "beta", "gamma"],
                     ["127.0.0.1"], operator_keys=True)  # test keys: made here, not at sites
    other = provision(root / "other", "Other Consortium", ["alpha"], ["127.0.0.1"], operator_keys=True)
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "echo_app.py").write_text(APP_MODULE)
    home = root / "cli_home"
    started = []
    link = sl.start_superlink(prov.server_ca_cert, prov.server_cert, prov.server_key,
                              root / "superlink", task_poll_interval=POLL)
    try:
        sl.write_connection(home, CONN, link.address, prov.ca_cert)
        node_ids = {
            site: sl.register_site_key(site, prov.site_public_keys[site], home, CONN)
            for site in ("alpha", "beta")
        }

        def supernode(site, ca_cert=None, key=None, wait=True, fast=False):
            files = prov.sites[site]
            handle = start_supernode(
                link.address, ca_cert or files.ca_cert, key or files.private_key,
                {"site": site}, work_dir=root / f"sn-{site}-{len(started)}",
                wait=False, task_poll_interval=POLL,
                warm_clientapp=fast, idle_poll=0.5 if fast else None,  # opt-in flower_speedups
            )
            started.append(handle)
            if wait:
                handle.wait_connected(30)
            return handle

        # alpha: Flower as shipped; beta: the opt-in speed-ups (fl_client.flower_speedups)
        nodes = {site: supernode(site, wait=False, fast=site == "beta") for site in ("alpha", "beta")}
        for handle in nodes.values():
            handle.wait_connected(30)
        yield {
            "prov": prov, "other": other, "app": app, "home": home, "link": link,
            "root": root, "nodes": nodes, "node_ids": node_ids, "supernode": supernode,
        }
    finally:
        sl.stop_all(started + [link])
        assert not link.is_running() and not any(h.is_running() for h in started)


def test_flwr_run_reaches_both_sites(fed):
    assert {s: h.node_id for s, h in fed["nodes"].items()} == fed["node_ids"]
    out = fed["root"] / "replies.json"
    t0 = time.monotonic()
    run_id = sl.submit_app(fed["app"], fed["home"], CONN, {"out-file": str(out)})
    status = sl.wait_for_run(run_id, fed["home"], CONN, timeout=60, poll=0.5)
    elapsed = time.monotonic() - t0
    assert status == "finished:completed", sl.run_logs(run_id, fed["home"], CONN)
    replies = json.loads(out.read_text())
    assert replies["errors"] == []
    assert replies["sites"] == {
        "alpha": {"node_id": fed["node_ids"]["alpha"], "num-examples": 5},
        "beta": {"node_id": fed["node_ids"]["beta"], "num-examples": 4},
    }
    assert "flower_speedups" not in fed["nodes"]["alpha"].new_log()  # Flower as shipped
    assert FORK_MARKER in fed["nodes"]["beta"].new_log()  # beta's ClientApp ran in a fork
    print(f"\nflwr run -> finished in {elapsed:.1f}s; one round {replies['round_s']:.1f}s")


def test_unregistered_key_is_refused(fed):
    with pytest.raises(SuperNodeError) as err:
        fed["supernode"]("gamma")
    message = str(err.value)
    assert "\n" not in message
    assert "not registered (or was revoked)" in message and "gamma_auth" in message


def test_supernode_trusting_another_ca_fails_clearly(fed):
    other_ca = fed["other"].sites["alpha"].ca_cert
    with pytest.raises(SuperLinkConnectionError) as err:
        wait_for_superlink(fed["link"].address, other_ca, timeout=5)
    assert err.value.kind == "tls_ca_mismatch"
    assert f"not signed by the CA in {other_ca}" in str(err.value)

    with pytest.raises(SuperNodeError) as err:
        fed["supernode"]("alpha", ca_cert=other_ca)
    message = str(err.value)
    assert "\n" not in message
    assert "TLS certificate verify failed" in message
    assert f"not signed by the CA in {other_ca}" in message


def test_wait_for_superlink_ok_and_unreachable(fed):
    assert wait_for_superlink(fed["link"].address, fed["prov"].ca_cert, timeout=5) == 1
    port = sl.free_port()
    t0 = time.monotonic()
    with pytest.raises(SuperLinkConnectionError) as err:
        wait_for_superlink(f"127.0.0.1:{port}", fed["prov"].ca_cert, timeout=1.5,
                           backoff=0.2)
    assert err.value.kind == "unreachable" and "connection refused" in str(err.value)
    assert 1.4 < time.monotonic() - t0 < 5


def test_revoked_site_is_refused(fed):
    beta = fed["nodes"]["beta"]
    sl.revoke_site_key("beta", fed["home"], CONN)
    reason = beta.wait_exit(timeout=20)  # refused (HTTP 401) at its next request
    assert "was revoked" in reason
    statuses = {n["node-id"]: n["status"] for n in sl.list_supernodes(fed["home"], CONN)}
    assert statuses[str(fed["node_ids"]["beta"])] == "unregistered"
    assert fed["nodes"]["alpha"].is_running()

    with pytest.raises(SuperNodeError, match="not registered \\(or was revoked\\)"):
        fed["supernode"]("beta")
    with pytest.raises(sl.FlwrCliError, match="revoked key can never be registered"):
        sl.register_site_key("beta", fed["prov"].site_public_keys["beta"], fed["home"], CONN)


def test_registrations_survive_superlink_restart(fed):
    link = fed["link"]
    sl.stop_all(list(fed["nodes"].values()) + [link])
    prov = fed["prov"]
    again = sl.start_superlink(prov.server_ca_cert, prov.server_cert, prov.server_key,
                               link.state_dir, task_poll_interval=POLL)
    try:
        sl.write_connection(fed["home"], CONN, again.address, prov.ca_cert)
        statuses = {n["node-id"]: n["status"] for n in sl.list_supernodes(fed["home"], CONN)}
        assert statuses[str(fed["node_ids"]["alpha"])] in ("offline", "online", "registered")
        assert statuses[str(fed["node_ids"]["beta"])] == "unregistered"
    finally:
        again.stop()


# ------------------------------------------- TLS diagnosis against a plain TLS server


@contextmanager
def _tls_server(tmp_path, cert, key):
    """A TLS server on 127.0.0.1 that only completes handshakes, with the given cert."""
    (tmp_path / "srv.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "srv.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_check_superlink_names_expired_and_wrong_host_certificates(tmp_path):
    ca, ca_key = make_ca("Demo")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired, key = make_server_cert(ca, ca_key, ["127.0.0.1"], valid_days=10,
                                    not_before=past)
    with _tls_server(tmp_path, expired, key) as address:
        kind, message = check_superlink(address, ca_file)
    assert kind == "tls_expired"
    assert f"expired on {(past + dt.timedelta(days=10)):%Y-%m-%d}" in message

    wrong_host, key = make_server_cert(ca, ca_key, ["fl.example.org"])
    with _tls_server(tmp_path, wrong_host, key) as address:
        kind, message = check_superlink(address, ca_file)
        assert kind == "tls_host_mismatch"
        assert "host 127.0.0.1 not in certificate SANs ['fl.example.org']" in message
        with pytest.raises(SuperLinkConnectionError, match="not in certificate SANs"):
            wait_for_superlink(address, ca_file, timeout=5)
