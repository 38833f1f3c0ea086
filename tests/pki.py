"""Test plumbing: the secure broker every integration test gets by default.

A :class:`TestBroker` is a real Mosquitto with mutual TLS, identity = username =
client id, the per-device ACL and a CRL, made from a fleet CA of its own
(:attr:`FleetPki.identity_dir`) that the hubs under test share
(``hub serve --identity-dir``). Whatever connects to it has a certificate:

- a hub issues itself its client certificates from that CA; the ACL gives the
  hub rights to the identities of :data:`HUB_CLIENT_IDS`;
- an agent gets an enrolled data directory, as ``driftless agent enroll``
  leaves it (:meth:`FleetPki.enroll_agent`);
- simulated devices get the identity directory ``sim run --enroll`` leaves
  (:meth:`FleetPki.sim_identities`);
- a raw test peer (playing the hub, an operator's console, or devices seen
  from outside) is one of :data:`PEERS` ``admin:`` identities the ACL grants
  the hub's rights, as ``hub serve --broker-acl-admin`` would. A test names its peers
  by role ("d1-old"); the same name always gets the same certificate, hence
  the same client id, so persistent sessions resume as they would.

The plain listener (``driftless broker run --plain``, ``demo --plain``) is
tested through the commands that offer it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
from pathlib import Path

from devtools.broker import MosquittoBroker, hub_broker_args
from edge_agent.enroll import Identity
from hub.broker_config import TlsFiles, hub_identities, write_secure_files
from hub.identity import CertificateAuthority, client_identity, write_new_private
from simulator.enroll import DeviceIdentities

HUB_CLIENT_IDS = ("driftless-hub", "hub-test")
PEERS = 16


class FleetPki:
    """The fleet CA of one test broker and the identities tests take from it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.now = dt.datetime.now(dt.UTC)
        self.ca = CertificateAuthority.load_or_create(self.identity_dir, now=self.now)
        self.peer_names = tuple(f"admin:peer-{n:02d}" for n in range(PEERS))
        hubs = [name for client_id in HUB_CLIENT_IDS for name in hub_identities(client_id)]
        self.files: TlsFiles = write_secure_files(
            self.ca,
            self.directory / "broker-tls",
            hub_identities=[*hubs, *self.peer_names],
            revoked=[],
            now=self.now,
        )
        self._peers: dict[str, str] = {}

    @property
    def identity_dir(self) -> Path:
        """The hub's ``--identity-dir``: the CA (and the hubs' own client certificates)."""
        return self.directory / "identity"

    def peer_name(self, role: str | None = None) -> str:
        """The certificate name (and client id) of the peer playing ``role``; None: a new one."""
        role = role if role is not None else f"anonymous-{len(self._peers)}"
        if role not in self._peers:
            if len(self._peers) == len(self.peer_names):
                raise RuntimeError(f"more than {PEERS} test peers on one broker")
            self._peers[role] = self.peer_names[len(self._peers)]
        return self._peers[role]

    def client_context(self, name: str) -> ssl.SSLContext:
        """Mutual TLS as ``name`` (issued on first use), trusting only the fleet CA."""
        cert, key = client_identity(self.ca, self.directory / "clients", name, now=self.now)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca.cert_path))
        context.load_cert_chain(cert, key)
        return context

    def enroll_agent(
        self, data_dir: Path, device_id: str, *, broker_url: str, root: Path | None = None
    ) -> None:
        """Leave ``data_dir`` as ``driftless agent enroll`` would: certificate, CA, record, root."""
        identity = Identity(data_dir)
        if identity.enrolled():
            return  # enrolled once: a restarted agent keeps its identity
        key_pem, issued = self.ca.issue_keypair(device_id, server=False, now=self.now)
        write_new_private(identity.key, key_pem)
        identity.cert.write_bytes(issued.pem)
        shutil.copyfile(self.ca.cert_path, identity.ca)
        if root is not None:
            shutil.copyfile(root, identity.root)
        record = {"device_id": device_id, "broker_url": broker_url, "not_after": None}
        identity.record.write_text(json.dumps(record) + "\n")

    def sim_identities(
        self, directory: Path, device_ids: list[str], *, root: Path | None = None
    ) -> Path:
        """Leave ``directory`` as ``sim run --enroll`` would for ``device_ids``; returns it."""
        identities = DeviceIdentities(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.ca.cert_path, identities.ca)
        if root is not None:
            shutil.copyfile(root, identities.root)
        for device_id in device_ids:  # the same layout: <id>.crt and <id>.key
            client_identity(self.ca, directory, device_id, now=self.now)
        return directory


class TestBroker(MosquittoBroker):
    """A real Mosquitto for one test, with mutual TLS from its own fleet CA."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        self.pki = FleetPki(directory / "pki")
        super().__init__(directory / "broker", tls=self.pki.files)

    def peer_tls(self, role: str | None = None) -> tuple[str, ssl.SSLContext]:
        """``(client id, TLS context)`` for a raw test peer playing ``role``."""
        name = self.pki.peer_name(role)
        return name, self.pki.client_context(name)

    def hub_args(self, *, manage: bool = False) -> list[str]:
        """What ``hub serve`` needs to speak to this broker: the shared fleet CA.

        ``manage``: the hub also keeps the broker's CRL and ACL (revocation, SIGHUP),
        keeping the test peers in the ACL, and hands devices this broker's URL at
        enrollment.
        """
        if manage:
            return hub_broker_args(self, self.pki.identity_dir, acl_admins=self.pki.peer_names)
        return ["--identity-dir", str(self.pki.identity_dir)]
