"""Hub configuration: one frozen object, every limit in it with its unit in the name.

Rules:
- No module-level settings instance: whoever starts the hub builds one and passes it down.
- Construction validates: a bad broker URL or a non-positive limit raises ValueError
  at start-up, not at the first connect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from firmware_bundles.limits import DEFAULT_LIMITS as BUNDLE_LIMITS
from hub.bundles.files import MAX_BUNDLE_FILE_BYTES
from plumbing import net
from plumbing.net import BrokerAddress
from protocols import MAX_CHUNK_BYTES, MAX_PAYLOAD_BYTES


def parse_broker_url(url: str) -> BrokerAddress:
    """Pure: the hub's broker URL (``mqtt://`` or ``mqtts://``); raises ValueError."""
    return net.parse_broker_url(url)


# Limits that must be above zero (units in the names).
_POSITIVE = (
    "broker_cutoff_retry_s",
    "placement_interval_s",
    "rollout_interval_s",
    "rollout_lease_s",
    "heartbeat_s",
    "offline_after_missed",
    "mqtt_keepalive_s",
    "mqtt_timeout_s",
    "mqtt_reconnect_min_s",
    "mqtt_reconnect_max_s",
    "mqtt_session_expiry_s",
    "mqtt_receive_max_messages",
    "mqtt_max_inflight_publishes",
    "ingest_batch_max",
    "publish_batch_max",
    "max_config_bytes",
    "max_request_body_bytes",
    "page_size_default",
    "page_size_max",
    "db_busy_timeout_ms",
    "max_bundle_bytes",
    "bundle_io_chunk_bytes",
    "bundle_upload_stale_s",
    "bundle_chunk_max_bytes",
    "bundle_serve_concurrency",
    "bundle_serve_queue_max",
    "bundle_serve_device_queue_max",
)

# The schema's bounds on paging (a deployment's page_size_max may be lower, not higher).
API_MAX_PAGE_SIZE = 1000
API_MAX_OFFSET = 10**9  # past any table the hub keeps; larger is refused, not an SQL error


@dataclass(frozen=True)
class HubSettings:
    """Everything the hub process needs; limits carry their unit in the name."""

    broker_url: str
    db_url: str
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    mqtt_client_id: str = "driftless-hub"

    # MQTT link
    mqtt_keepalive_s: int = 15
    mqtt_timeout_s: float = 10.0
    mqtt_reconnect_min_s: float = 0.2
    mqtt_reconnect_max_s: float = 10.0
    # A connection that stayed up this long resets the backoff to its minimum.
    mqtt_stable_after_s: float = 5.0
    mqtt_session_expiry_s: int = 86_400
    # MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may have in
    # flight to the hub. The hub acknowledges only after the DB commit, so this also
    # bounds the messages held in memory.
    mqtt_receive_max_messages: int = 1000
    mqtt_max_inflight_publishes: int = 100
    mqtt_shared_group: str = "hub"

    # ingest and publish
    ingest_batch_max: int = 500
    publish_batch_max: int = 500
    # False: this process serves the API only (``hub serve --no-link``); another hub
    # process over the same database runs the MQTT link.
    run_link: bool = True
    # > 0: the link also polls the database's change feed this often, so changes made
    # through API-only processes are published (within this delay). 0: not needed.
    desired_poll_s: float = 0.0

    # API limits
    max_config_bytes: int = 200 * 1024
    # Whole HTTP request bodies; larger ones get 413 before they are parsed.
    max_request_body_bytes: int = 1024 * 1024
    page_size_default: int = 100
    page_size_max: int = 1000
    api_access_log: bool = False
    # Serve the API over HTTPS with this certificate and key (PEM); unset: plain HTTP.
    api_tls_cert_path: Path | None = None
    api_tls_key_path: Path | None = None

    # database
    db_busy_timeout_ms: int = 5000

    # bundle store
    # Where bundle files live; None: "bundles" beside the SQLite file (required otherwise).
    bundles_dir: Path | None = None
    # The fleet's root.json (``driftless keys init-root``); None: uploads answer 503.
    trust_root_path: Path | None = None
    # identity and enrollment
    # The fleet CA (ca.key, ca.crt; created on first start); None: "identity" beside
    # the SQLite file; with neither (another database, SQLite in memory) enrollment is off.
    identity_dir: Path | None = None
    # The broker URL enrolled devices are told to use (e.g. mqtts://broker.example:8883).
    public_broker_url: str | None = None
    device_cert_validity_days: int = 365
    # Renewal over MQTT (cert_req): at most one certificate per device this often.
    cert_renew_min_interval_s: float = 3600.0
    # TLS to the broker (mqtts:// URLs). Unset: trust the fleet CA and present client
    # certificates the hub issues itself from it (identity/clients/<client id>.crt).
    broker_tls_ca_path: Path | None = None
    broker_tls_cert_path: Path | None = None
    broker_tls_key_path: Path | None = None
    # A broker beside the hub: where it reads its CRL, and its pid file. Set: the hub
    # writes the CRL at start and on every revocation, then sends the broker SIGHUP.
    broker_crl_path: Path | None = None
    broker_pid_file: Path | None = None
    # The broker's ACL file: rewritten with the CRL (hub identities, revoked devices denied).
    broker_acl_path: Path | None = None
    # More certificate names with the hub's rights in that ACL (an operations console, a
    # bridge); each is one more holder of fleet-wide broker access. Each must be an
    # ``admin:NAME`` service name, which no device id can be (hub.identity).
    broker_acl_admins: tuple[str, ...] = ()
    # How a decommissioned device's open connections are closed: "dynsec" asks the
    # broker's dynamic security plugin (Mosquitto 2, loaded by ``broker run``/``broker
    # config``) to kick its username, and re-enrolling or purging the id waits for the
    # broker's confirmation; "none" relies on the ACL reload alone (a live session then
    # keeps its socket, with every topic denied). Only over TLS: a plain broker has no
    # identities to cut off.
    broker_cutoff: Literal["dynsec", "none"] = "dynsec"
    # While a cut-off is unconfirmed, it is asked again after this long (doubling to 5 min).
    broker_cutoff_retry_s: float = 5.0
    # The placement controller looks at the fleet at least this often (a cheap check
    # first: it plans only when devices came, went, flipped online or reported), and
    # whenever a desired change wakes it or a failover timer is due.
    placement_interval_s: float = 10.0
    # While a rollout is active its controller looks at least this often (reports
    # arrive all the time); a look takes the rollout's lease for rollout_lease_s, so a
    # second hub process leaves it alone until this one stops renewing it.
    rollout_interval_s: float = 1.0
    rollout_lease_s: float = 30.0
    # Liveness: a device's heartbeat interval when its birth does not announce one
    # (seconds); the liveness controller marks a device offline once it was silent (no
    # message of any kind) for ``offline_after_missed`` of its intervals, Will or not.
    heartbeat_s: float = 30.0
    offline_after_missed: int = 3

    # Ed25519 keys of the fleet root's hub role (``driftless keys add --role hub``):
    # every desired document is signed by each. Empty: documents go out unsigned.
    signing_key_paths: tuple[Path, ...] = ()
    max_bundle_bytes: int = 1024 * 1024 * 1024
    # Uploads are written to disk in pieces of this size (memory per upload).
    bundle_io_chunk_bytes: int = 1024 * 1024
    # Allowance for the hub's clock when checking expiry; the hub's clock is trusted.
    bundle_clock_skew_s: int = 0
    # Temporary upload files older than this are removed at start-up (crash leftovers).
    bundle_upload_stale_s: int = 3600

    # bundle transfer over MQTT (hub/bundles/chunks.py: its own connection, client id
    # "<mqtt_client_id>-bundles")
    # Largest chunk one request may ask for; a longer request gets a ``too_long`` frame.
    bundle_chunk_max_bytes: int = MAX_CHUNK_BYTES
    # Chunks read and published at once across devices (each holds one chunk in memory).
    bundle_serve_concurrency: int = 16
    # Requests waiting to be served, all devices together; more are dropped and counted.
    bundle_serve_queue_max: int = 10_000
    # Requests waiting per device (a device's window is far smaller); more are dropped.
    bundle_serve_device_queue_max: int = 64

    def __post_init__(self) -> None:
        if not self.db_url:
            raise ValueError("db_url must not be empty (e.g. sqlite:///driftless-hub.db)")
        if not self.mqtt_client_id:
            raise ValueError("mqtt_client_id must not be empty (the session is keyed by it)")
        self.broker()
        self.bundle_directory()
        if self.public_broker_url is not None:
            net.parse_broker_url(self.public_broker_url)
        from hub.broker_config import hub_identities
        from hub.identity import check_service_name

        hub_identities(self.mqtt_client_id)  # its certificate names must be service names
        for name in self.broker_acl_admins:
            check_service_name(name, kinds=("admin",))
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for broken, why in self._rules():
            if broken:
                raise ValueError(why)

    def _rules(self) -> list[tuple[bool, str]]:
        """Pure: ``(broken, why)`` for every rule between settings (the first broken one
        stops the start)."""
        skew_max = BUNDLE_LIMITS.max_clock_skew_s
        return [
            (self.broker_cutoff not in ("dynsec", "none"), "broker_cutoff: 'dynsec' or 'none'"),
            (
                self.mqtt_reconnect_max_s < self.mqtt_reconnect_min_s,
                "mqtt_reconnect_max_s must be >= mqtt_reconnect_min_s",
            ),
            (
                self.page_size_default > self.page_size_max,
                "page_size_default must be <= page_size_max",
            ),
            (
                self.page_size_max > API_MAX_PAGE_SIZE,
                f"page_size_max must be <= {API_MAX_PAGE_SIZE}",
            ),
            (
                self.max_config_bytes >= MAX_PAYLOAD_BYTES,
                f"max_config_bytes must stay below protocols.MAX_PAYLOAD_BYTES "
                f"({MAX_PAYLOAD_BYTES}) so the whole desired document fits in one message",
            ),
            (
                self.max_request_body_bytes <= self.max_config_bytes,
                "max_request_body_bytes must exceed max_config_bytes",
            ),
            (
                self.mqtt_receive_max_messages > 65_535,
                "mqtt_receive_max_messages is an MQTT 5 Receive Maximum: <= 65535",
            ),
            (
                self.max_bundle_bytes > MAX_BUNDLE_FILE_BYTES,
                f"max_bundle_bytes must not exceed {MAX_BUNDLE_FILE_BYTES}, "
                "the largest bundle file the format allows",
            ),
            (
                self.bundle_chunk_max_bytes > MAX_CHUNK_BYTES,
                f"bundle_chunk_max_bytes must not exceed {MAX_CHUNK_BYTES} "
                "(protocols.MAX_CHUNK_BYTES: a frame must fit the broker's max_packet_size)",
            ),
            (
                not 0 <= self.bundle_clock_skew_s <= skew_max,
                f"bundle_clock_skew_s must be within 0..{skew_max}",
            ),
            (
                (self.api_tls_cert_path is None) != (self.api_tls_key_path is None),
                "api_tls_cert_path and api_tls_key_path go together",
            ),
            (
                (self.broker_tls_cert_path is None) != (self.broker_tls_key_path is None),
                "broker_tls_cert_path and broker_tls_key_path go together",
            ),
            (self.desired_poll_s < 0, "desired_poll_s must not be negative"),
            (self.cert_renew_min_interval_s < 0, "cert_renew_min_interval_s must not be negative"),
            (
                not 1 <= self.device_cert_validity_days <= 3650,
                "device_cert_validity_days must be within 1..3650",
            ),
        ]

    def broker(self) -> BrokerAddress:
        """The parsed broker address; raises ValueError on a bad URL."""
        return parse_broker_url(self.broker_url)

    @property
    def cuts_off_sessions(self) -> bool:
        """Whether the hub closes decommissioned devices' sessions at the broker (and so
        waits for that before an id is enrolled again or purged)."""
        return self.broker_cutoff == "dynsec" and self.broker().tls

    def bundle_directory(self) -> Path:
        """Where bundle files live: ``bundles_dir``, else ``bundles`` beside the SQLite file.

        Raises ValueError when neither applies (another database, or SQLite in memory).
        """
        if self.bundles_dir is not None:
            return Path(self.bundles_dir)
        return self._beside_database("bundles", "bundles_dir")

    def identity_directory(self) -> Path:
        """Where the fleet CA lives: ``identity_dir``, else ``identity`` beside the SQLite file."""
        if self.identity_dir is not None:
            return Path(self.identity_dir)
        return self._beside_database("identity", "identity_dir")

    def _beside_database(self, name: str, setting: str) -> Path:
        try:
            url = make_url(self.db_url)
        except ArgumentError as exc:
            raise ValueError(f"db_url {self.db_url!r}: {exc}") from None
        database = url.database or ""
        if (
            url.get_backend_name() == "sqlite"
            and database
            and database != ":memory:"
            and not database.startswith("file:")
        ):
            return Path(database).expanduser().resolve().parent / name
        raise ValueError(
            f"{setting} must be set when the database is not a SQLite file (db_url {self.db_url!r})"
        )
