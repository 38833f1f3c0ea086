"""``docs/protocol.md`` against the code: the document must let a third party build a device.

Each test reads the document and fails when it drifts from ``protocols/`` (or
from the hub and agent behaviour it describes):

- every JSON example decodes under the model of its ``kind`` and shows no
  field the model lacks; together the examples show every field;
- the topic table lists exactly the channels, with their directions and
  retain flags; the Envelope's kinds are the codec's; the field tables give
  every model's fields with their types, required flags and limits;
- every limit written next to a ``protocols`` constant equals it; the
  connection timings equal the agent's ``MqttSettings``;
- the hub's subscriptions are the link's; every rejection reason is listed;
  every link into ``docs/bundles.md`` (and within the page) has its heading;
- the test vector verifies, and a device written from the document alone
  (``tests/unit/doc_device.py``) decides like the reference agent's core.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import protocols
from edge_agent.core import (
    AgentCore,
    AgentState,
    Booted,
    Connected,
    Connecting,
    DesiredPayload,
    Ignored,
    Publish,
    Rejected,
    Subscribed,
    Switch,
)
from edge_agent.settings import KEEPALIVE_MAX_S, KEEPALIVE_MIN_S, MqttSettings
from firmware_bundles.errors import ThresholdNotMetError
from firmware_bundles.keys import SigningKey
from firmware_bundles.trust import TrustedRoot
from hub.devices.rules import Reject
from hub.mqtt.link import link_subscriptions
from hub.settings import HubSettings
from protocols import MESSAGE_TYPES, Channel, Desired, Reason, Reported, decode, encode
from protocols.signed import open_sealed, seal
from protocols.topics import TOPIC_ROOT, shared_subscription
from tests.unit import doc_device
from tests.unit.test_bundles_support import NOW, Fleet, new_keys

DOCS = Path(__file__).parents[2] / "docs"
DOC = (DOCS / "protocol.md").read_text()
OPERATIONS = (DOCS / "operations.md").read_text()
BUNDLES_DOC = (DOCS / "bundles.md").read_text()

MODELS: dict[str, type[Any]] = {cls.__struct_config__.tag: cls for cls in MESSAGE_TYPES}
JSON_CHANNELS = {c for c in Channel if c is not Channel.BUNDLE_DATA}


# ---------------------------------------------------------------- reading the document


def section(heading: str, text: str = DOC) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n") + len(heading) + 1
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], re.M)]
    return text[start : start + ends[0]] if ends else text[start:]


def json_blocks() -> list[tuple[int, str]]:
    """Every ```json block: (line number, text)."""
    return [
        (DOC[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```json\n(.*?)^```$", DOC, re.M | re.S)
    ]


def table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table in ``text`` whose header row starts so."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def unquote(cell: str) -> str:
    return cell.replace("`", "").replace("*", "").strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = [
        ch for ch in heading.strip().lower() if ch in " -_" or unicodedata.category(ch)[0] in "LN"
    ]
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


# ---------------------------------------------------------------- the test vector

VECTOR_NOW = 1795946046
ROOT_SEED = bytes(range(32))
HUB_SEED = bytes(range(32, 64))


def vector_root_bytes() -> bytes:
    for _, block in json_blocks():
        if '"_type":"root"' in block:
            return block.strip().encode()
    raise AssertionError("no root.json in the test vector")


def vector_root() -> TrustedRoot:
    return TrustedRoot.from_bytes(vector_root_bytes())


# ---------------------------------------------------------------- examples


def _example_params() -> list[Any]:
    params = []
    for line, block in json_blocks():
        value = json.loads(block)
        name = "root" if '"_type":"root"' in block else value.get("kind", "signed")
        params.append(pytest.param(line, block, id=f"line-{line}-{name}"))
    return params


@pytest.mark.parametrize(("line", "block"), _example_params())
def test_every_json_example_decodes_under_its_model(line: int, block: str) -> None:
    data = block.strip().encode()
    value = json.loads(data)
    if "signatures" in value and value["signed"].get("_type") == "root":
        assert vector_root().version == value["signed"]["version"]
        return
    if "signatures" in value:  # a signed desired document: it verifies under the vector root
        message = open_sealed(data, vector_root(), now=VECTOR_NOW, clock_skew_s=0)
        value, data = json.loads(message), message
    kind = value.get("kind")
    assert kind in MODELS, f"line {line}: kind {kind!r} is not one of {sorted(MODELS)}"
    decode(data, MODELS[kind])  # raises ProtocolError with the reason
    unknown = set(value) - field_names(MODELS[kind])
    assert not unknown, f"line {line}: fields the {kind} model does not have: {unknown}"
    if isinstance(value.get("inventory"), dict):
        assert set(value["inventory"]) <= field_names(protocols.Inventory)
    for workload in value.get("workloads") or ():
        assert set(workload) <= field_names(protocols.WorkloadStatus)
    for lock in value.get("locks") or ():
        assert set(lock) <= field_names(protocols.LockStatus)
    for job in value.get("jobs") or ():
        assert set(job) <= field_names(protocols.JobStatus)


def field_names(model: type[Any]) -> set[str]:
    names = {f.encode_name for f in msgspec.structs.fields(model)}
    tag = model.__struct_config__.tag_field
    return names | ({tag} if tag else set())


def test_the_examples_show_every_field_of_every_message() -> None:
    shown: dict[str, set[str]] = {kind: set() for kind in MODELS}
    for _, block in json_blocks():
        value = json.loads(block)
        if "signatures" in value:
            value = value["signed"]
        if value.get("kind") in shown:
            shown[value["kind"]] |= set(value)
    for kind, model in MODELS.items():
        assert shown[kind] == field_names(model), (
            f"{kind}: examples lack {field_names(model) - shown[kind]}"
        )
    nested = {
        "inventory": protocols.Inventory,  # objects inside messages: every field shown too
        "workloads": protocols.WorkloadStatus,
        "locks": protocols.LockStatus,
        "jobs": protocols.JobStatus,
    }
    for key, model in nested.items():
        seen: set[str] = set()
        for _, block in json_blocks():
            value = json.loads(block)
            found = value.get(key)
            for item in found if isinstance(found, list) else [found]:
                if isinstance(item, dict):
                    seen |= set(item)
        assert seen == field_names(model), f"{key}: examples lack {field_names(model) - seen}"


def test_a_broken_example_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: a field renamed in an example is caught."""
    broken = DOC.replace('"generation": 42,', '"generation": "42",', 1)
    monkeypatch.setattr(f"{__name__}.DOC", broken)
    line, block = next((n, b) for n, b in json_blocks() if '"generation": "42"' in b)
    with pytest.raises(protocols.ProtocolError) as caught:
        test_every_json_example_decodes_under_its_model(line, block)
    assert caught.value.reason is Reason.INVALID_FIELDS


# ---------------------------------------------------------------- topics and kinds


def test_the_topic_table_lists_every_channel_with_its_direction() -> None:
    rows = table_after(section("## Topics"), "| channel | topic | direction |")
    assert [row[0] for row in rows] == [c.value for c in Channel]
    for channel_name, topic_cell, direction, qos, retain, payload in rows:
        channel = Channel(channel_name)
        assert unquote(topic_cell) == f"{TOPIC_ROOT}/{{id}}/{channel.value}"
        assert direction == channel.direction.value, channel
        assert qos == "1"
        assert retain == ("yes" if channel.retained else "no"), channel
        if channel in JSON_CHANNELS:
            assert unquote(payload).split()[0] == MODELS[channel.value].__name__, channel
        else:
            assert "binary" in payload


def test_every_json_kind_is_its_channel() -> None:
    assert set(MODELS) == {c.value for c in JSON_CHANNELS}


def test_the_envelope_lists_the_codecs_kinds() -> None:
    bullet = section("## Envelope").split("- `kind`:", 1)[1].split("\n- ", 1)[0]
    listed = re.search(r"the kinds are (.+?)\.", " ".join(bullet.split()))
    assert listed is not None, "the `kind` bullet must say 'the kinds are …'"
    assert re.findall(r"`([a-z_]+)`", listed.group(1)) == list(MODELS)


def test_the_hubs_subscriptions_are_the_links() -> None:
    text = " ".join(section("## Topics").split("The hub's MQTT link subscribes", 1)[1].split())
    listed = text.split("The hub's bundle chunk server", 1)[0]
    documented = set(re.findall(r"`((?:\$share/|\$CONTROL/|driftless/)[^`]+)`", listed))
    documented -= {"$CONTROL/dynamic-security/v1"}  # the topic it publishes on, named beside
    settings = HubSettings(broker_url="mqtts://broker.example:8883", db_url="sqlite:///hub.db")
    assert settings.cuts_off_sessions
    assert documented == set(link_subscriptions(settings, renews=True))
    chunk_server = shared_subscription(settings.mqtt_shared_group, Channel.BUNDLE_REQ)
    assert f"`{chunk_server}`" in text


# ---------------------------------------------------------------- field tables

TYPE_NAMES: dict[type[Any], str] = {
    msgspec.inspect.IntType: "integer",
    msgspec.inspect.FloatType: "number",
    msgspec.inspect.StrType: "string",
    msgspec.inspect.BoolType: "boolean",
    msgspec.inspect.DictType: "object",
    msgspec.inspect.StructType: "object",
    msgspec.inspect.LiteralType: "string",
    msgspec.inspect.ListType: "array",
}


def type_name(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.UnionType):
        names = [type_name(t) for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        return " or ".join([*names, "null"])
    return TYPE_NAMES[type(info)]


MINUS, TIMES = "\N{MINUS SIGN}", "\N{MULTIPLICATION SIGN}"  # as the document writes them


def _bound(value: int) -> str:
    named = {2**63 - 1: f"2^63 {MINUS} 1", 2**32 - 1: f"2^32 {MINUS} 1"}
    return named.get(value, f"{value:,}")


def rule_fragments(info: msgspec.inspect.Type) -> list[str]:
    """What the rule column must say for a field of this type (its limits)."""
    if isinstance(info, msgspec.inspect.UnionType):
        return [f for t in info.types for f in rule_fragments(t)]
    if isinstance(info, msgspec.inspect.IntType):
        return [f"{_bound(info.ge or 0)} … {_bound(info.le or 2**63 - 1)}"]
    if isinstance(info, msgspec.inspect.FloatType) and info.ge is not None:
        return [f"≥ {info.ge:g}"]
    if isinstance(info, msgspec.inspect.StrType):
        fragments = [f"`{info.pattern}`"] if info.pattern else []
        if info.max_length is not None and info.min_length:
            fragments.append(f"{info.min_length} to {info.max_length:,} characters")
        elif info.max_length is not None:
            fragments.append(f"at most {info.max_length:,} characters")
        return fragments
    if isinstance(info, msgspec.inspect.LiteralType):
        return [f"`{value}`" for value in info.values]
    if isinstance(info, msgspec.inspect.ListType):
        item = info.item_type
        named = [f"`{item.cls.__name__}`"] if isinstance(item, msgspec.inspect.StructType) else []
        return named + ([f"at most {info.max_length:,}"] if info.max_length is not None else [])
    return []


def _table_params() -> list[Any]:
    names = re.findall(r"^Fields of `(\w+)`", DOC, re.M)
    return [pytest.param(name, id=name) for name in names]


def test_every_model_has_one_field_table() -> None:
    names = re.findall(r"^Fields of `(\w+)`", DOC, re.M)
    expected = [cls.__name__ for cls in MESSAGE_TYPES] + [
        "Inventory",
        "WorkloadStatus",
        "LockStatus",
        "JobStatus",
    ]
    assert sorted(names) == sorted(expected)


@pytest.mark.parametrize("name", _table_params())
def test_each_field_table_matches_its_model(name: str) -> None:
    model = getattr(protocols, name)
    text = DOC.split(f"Fields of `{name}`", 1)[1]
    rows = {unquote(r[0]): r[1:] for r in table_after(text, "| field | type | required | rule |")}
    info = msgspec.inspect.type_info(model)
    assert isinstance(info, msgspec.inspect.StructType)
    expected = {f.encode_name: f for f in info.fields}
    if info.tag_field is not None:  # the envelope fields: both required, `kind` is the tag
        assert rows.pop("kind") == ["string", "yes", f"`{info.tag}`"]
        assert rows.pop("v") == ["integer", "yes", "`1`"]
        del expected["v"]
    assert list(rows) == list(expected), f"{name}: fields or their order differ"
    for field_name, (type_cell, required_cell, rule_cell) in rows.items():
        field = expected[field_name]
        assert type_cell == type_name(field.type), f"{name}.{field_name}"
        assert required_cell.split()[0] == ("yes" if field.required else "no"), field_name
        if (
            not field.required
            and field.default is not msgspec.NODEFAULT
            and "refuses" not in required_cell
        ):
            default = "null" if field.default is None else json.dumps(field.default)
            assert f"default {default}" in required_cell, f"{name}.{field_name}"
        for fragment in rule_fragments(field.type):
            assert fragment in rule_cell, f"{name}.{field_name}: the rule must say {fragment}"


# ---------------------------------------------------------------- limits and timings


def test_every_limit_named_by_its_constant_equals_it() -> None:
    found = re.findall(r"(\*\*[\d,]+\*\*|`[^`\n]+`)[^`(]{0,24}\(`(protocols(?:\.\w+)+)`\)", DOC)
    checked = set()
    for written, dotted in found:
        module_name, _, attribute = dotted.rpartition(".")
        module = __import__(module_name, fromlist=[attribute])
        value = getattr(module, attribute)
        text = written.strip("*`")
        assert (int(text.replace(",", "")) if isinstance(value, int) else text) == value, dotted
        checked.add(dotted)
    every_reference = set(re.findall(r"\(`(protocols(?:\.\w+)+)`\)", DOC))
    assert every_reference == checked, f"named without a value: {every_reference - checked}"
    assert {
        "protocols.MAX_PAYLOAD_BYTES",
        "protocols.MAX_CHUNK_BYTES",
        "protocols.DEVICE_ID_PATTERN",
        "protocols.PROTOCOL_VERSION",
        "protocols.topics.TOPIC_ROOT",
        "protocols.bundles.FRAME_HEADER_BYTES",
        "protocols.bundles.MAX_ERROR_DETAIL_BYTES",
    } <= checked


def test_the_connection_timings_are_the_agents() -> None:
    s = MqttSettings()
    text = " ".join(section("## Connection (device side)").split())
    assert f"uses **{s.keepalive_s} s**" in text
    assert f"from {KEEPALIVE_MIN_S} to {KEEPALIVE_MAX_S:,} s" in text
    assert f"asks for {s.session_expiry_s:,} s" in text
    assert f"c = min({s.reconnect_max_s:g} s, {s.reconnect_min_s:g} s {TIMES} 2^n)" in text
    assert f"never waits more than **{s.reconnect_max_s:g} s**" in text
    assert f"within **{s.connect_timeout_s:g} s** (the connect timeout)" in text
    operations = " ".join(section("## How soon a dead device shows offline", OPERATIONS).split())
    assert f"default **{s.keepalive_s} s**, {KEEPALIVE_MIN_S} to {KEEPALIVE_MAX_S:,}" in operations
    assert f"doubling up to {s.reconnect_max_s:g} s" in operations
    assert f"{s.connect_timeout_s:g} s connect timeout" in operations


def test_every_rejection_reason_is_listed() -> None:
    rows = table_after(section("## Rejections"), "| reason | where | why |")
    listed = [unquote(row[0]) for row in rows]
    assert sorted(listed) == sorted({*(r.value for r in Reason), *(r.value for r in Reject)})


def test_every_link_has_its_heading() -> None:
    for target, anchor in re.findall(r"\]\((bundles\.md|)#([^)]+)\)", DOC):
        headings = anchors(BUNDLES_DOC if target else DOC)
        assert anchor in headings, f"{target or 'protocol.md'}#{anchor} has no heading"


# ---------------------------------------------------------------- the test vector


def test_the_test_vector_holds() -> None:
    vector = section("## Test vector")
    root_key = SigningKey(Ed25519PrivateKey.from_private_bytes(ROOT_SEED))
    hub_key = SigningKey(Ed25519PrivateKey.from_private_bytes(HUB_SEED))
    for key, seed in ((root_key, ROOT_SEED), (hub_key, HUB_SEED)):
        assert f"seed `{seed.hex()}`" in vector
        assert f"public key `{key.public_hex}`" in vector
        assert f"key id `{key.keyid}`" in vector
    root = vector_root_bytes()
    assert f"`root.json`, {len(root)} bytes" in vector
    signed_block = re.search(r"^```\n(\{\"kind\":\"desired\".*)\n```$", vector, re.M)
    assert signed_block is not None
    signed = signed_block.group(1).encode()
    assert f"these\n{len(signed)} bytes" in vector or f"these {len(signed)} bytes" in vector
    signature = hub_key.sign(signed).sig
    assert signature in vector
    envelope = next(b for _, b in json_blocks() if '"signed":{"kind"' in b).strip().encode()
    assert f"({len(envelope)} bytes)" in vector
    assert seal(signed, [hub_key]) == envelope, "the hub would write another envelope"
    assert open_sealed(envelope, vector_root(), now=VECTOR_NOW, clock_skew_s=0) == signed
    assert hashlib.sha256(bytes.fromhex(hub_key.public_hex)).hexdigest() == hub_key.keyid
    # The outcomes it promises, from the reference agent's core.
    assert outcome(core("pump-17", vector_root(), clock_skew_s=300), envelope, VECTOR_NOW) == (
        "apply",
        42,
    )
    assert outcome(core("pump-18", vector_root()), envelope, VECTOR_NOW) == (
        "reject",
        "device_mismatch",
    )
    expires = json.loads(root)["signed"]["expires"]
    late = core("pump-17", vector_root(), clock_skew_s=300)
    assert outcome(late, envelope, expires + 300) == ("reject", "expired")
    assert (
        outcome(core("pump-17", vector_root(), clock_skew_s=300), envelope, expires + 299)[0]
        == "apply"
    )
    # A device from the document agrees.
    device = doc_device.DocDevice("pump-17", doc_device.load_root(root))
    assert device.receive(envelope, VECTOR_NOW) == ("apply", 42)


# ---------------------------------------------------------------- a device from the document


def core(
    device_id: str,
    root: TrustedRoot | None,
    *,
    clock_skew_s: int = 0,
    state: AgentState | None = None,
) -> AgentCore:
    agent = AgentCore(
        device_id, state or AgentState(), "test", trusted_root=root, clock_skew_s=clock_skew_s
    )
    for event in (Booted(NOW), Connecting(NOW), Connected(NOW, False), Subscribed(NOW)):
        agent.handle(event)
    return agent


def outcome(agent: AgentCore, payload: bytes, now: float) -> tuple[str, Any]:
    """The reference core's decision, in the document device's terms."""
    actions = agent.handle(DesiredPayload(payload, now))
    for action in actions:
        if isinstance(action, Rejected):
            return "reject", action.reason
        if isinstance(action, Switch):  # the first step of a plain config's apply
            return "apply", action.desired.generation
        if isinstance(action, Publish):
            report = decode(action.payload, Reported)
            return "answer", {
                "phase": report.phase,
                "generation": report.generation,
                "error": report.error,
                "applied_generation": report.applied_generation,
                "failed_generation": report.failed_generation,
            }
    assert all(isinstance(a, Ignored) for a in actions), actions
    return "ignore", None


FLEET = Fleet()
TWO_OF_THREE = Fleet(hub_keys=new_keys(3), hub_threshold=2)


def doc(generation: int = 1, device: str = "d1", **config: object) -> bytes:
    return encode(
        Desired(device_id=device, generation=generation, config=dict(config), issued_at=1.5)
    )


def envelope(signed: bytes, signatures: list[dict[str, str]]) -> bytes:
    return b'{"signatures":' + json.dumps(signatures).encode() + b',"signed":' + signed + b"}"


def signatures(signed: bytes, keys: list[SigningKey]) -> list[dict[str, str]]:
    return [{"keyid": k.keyid, "sig": k.sign(signed).sig} for k in keys]


def _sealed(**config: object) -> Callable[[], bytes]:
    return lambda: seal(doc(3, **config), FLEET.hub_keys)


CASES: list[Any] = [
    pytest.param(FLEET, _sealed(x=1), id="valid"),
    pytest.param(
        FLEET, _sealed(note='} { " \\ }}', n=0.25), id="braces-quotes-and-fractions-in-strings"
    ),
    pytest.param(FLEET, lambda: b"", id="empty-payload"),
    pytest.param(FLEET, lambda: doc(3), id="bare-message"),
    pytest.param(FLEET, lambda: b"\xff not json {", id="not-json"),
    pytest.param(FLEET, lambda: b"[1, 2]", id="json-array"),
    pytest.param(FLEET, lambda: b'{"signatures": null, "signed": {}}', id="signatures-null"),
    pytest.param(FLEET, lambda: b"{" + b" " * protocols.MAX_PAYLOAD_BYTES + b"}", id="oversized"),
    pytest.param(
        FLEET,
        lambda: (
            b' { "signed" : '
            + doc(3)
            + b' ,\n "signatures" : '
            + json.dumps(signatures(doc(3), FLEET.hub_keys)).encode()
            + b" } "
        ),
        id="signed-first-with-whitespace-around",
    ),
    pytest.param(
        FLEET,
        lambda: (
            b'{"signatures":'
            + json.dumps(signatures(doc(3), FLEET.hub_keys)).encode()
            + b',"sig\\u006eed":'
            + doc(3)
            + b"}"
        ),
        id="escaped-member-name",
    ),
    pytest.param(
        FLEET,
        lambda: envelope(
            b'{ "kind" : "desired", "v":1,"device_id":"d1","generation":3,'
            b'"config":{},"issued_at":2}',
            [],
        ),
        id="no-signatures-whitespace-inside",
    ),
    pytest.param(
        FLEET,
        lambda: seal(
            b'{ "issued_at": 2, "config": {"a": [1, {"b": "}"}]},'
            b' "generation": 3, "device_id": "d1", "v": 1, "kind": "desired" }',
            FLEET.hub_keys,
        ),
        id="whitespace-and-order-inside-signed",
    ),
    pytest.param(FLEET, lambda: seal(doc(3), FLEET.release_keys), id="release-key"),
    pytest.param(FLEET, lambda: seal(doc(3), [SigningKey.generate()]), id="unknown-key"),
    pytest.param(FLEET, lambda: envelope(doc(3), []), id="no-signatures"),
    pytest.param(
        FLEET,
        lambda: envelope(doc(3), signatures(doc(2), FLEET.hub_keys)),
        id="signature-over-other-bytes",
    ),
    pytest.param(
        TWO_OF_THREE,
        lambda: envelope(doc(3), signatures(doc(3), TWO_OF_THREE.hub_keys[:1]) * 2),
        id="one-key-twice-for-threshold-two",
    ),
    pytest.param(TWO_OF_THREE, lambda: seal(doc(3), TWO_OF_THREE.hub_keys[1:]), id="two-of-three"),
    pytest.param(
        FLEET,
        lambda: envelope(doc(3), signatures(doc(3), FLEET.hub_keys) * 33),
        id="33-signatures",
    ),
    pytest.param(
        FLEET,
        lambda: envelope(doc(3), [{"keyid": "AB" * 32, "sig": "00" * 64}]),
        id="uppercase-key-id",
    ),
    pytest.param(
        FLEET,
        lambda: seal(doc(3), FLEET.hub_keys)[:-1] + b',"extra":1}',
        id="extra-envelope-member",
    ),
    pytest.param(FLEET, lambda: b'{"signatures":[]}', id="no-signed-member"),
    pytest.param(FLEET, lambda: envelope(b"[1]", []), id="signed-not-an-object"),
    pytest.param(
        FLEET,
        lambda: (
            envelope(doc(3), signatures(doc(3), FLEET.hub_keys))[:-1]
            + b',"signed":'
            + doc(9)
            + b"}"
        ),
        id="signed-twice",
    ),
    pytest.param(
        FLEET, lambda: seal(doc(3)[:-1] + b',"generation":9}', FLEET.hub_keys), id="repeat-inside"
    ),
    pytest.param(FLEET, lambda: seal(b'{"kind":"desired","v":2}', FLEET.hub_keys), id="version-2"),
    pytest.param(
        FLEET, lambda: seal(doc(3).replace(b'"v":1', b'"v":1.0'), FLEET.hub_keys), id="version-1.0"
    ),
    pytest.param(
        FLEET, lambda: seal(doc(3).replace(b'"v":1,', b""), FLEET.hub_keys), id="no-version"
    ),
    pytest.param(FLEET, lambda: seal(b'{"kind":"birth","v":1}', FLEET.hub_keys), id="wrong-kind"),
    pytest.param(
        FLEET,
        lambda: seal(doc(3).replace(b'"generation":3', b'"generation":0'), FLEET.hub_keys),
        id="generation-0",
    ),
    pytest.param(
        FLEET,
        lambda: seal(doc(3).replace(b'"issued_at":1.5', b'"issued_at":"now"'), FLEET.hub_keys),
        id="issued-at-a-string",
    ),
    pytest.param(FLEET, lambda: seal(doc(3, device="d2"), FLEET.hub_keys), id="another-device"),
    pytest.param(FLEET, lambda: seal(doc(1), FLEET.hub_keys), id="older-generation"),
    pytest.param(FLEET, lambda: seal(doc(2), FLEET.hub_keys), id="current-generation"),
]


@pytest.mark.parametrize(("fleet", "make"), CASES)
@pytest.mark.parametrize(
    "finished",
    [pytest.param((2, 0, None), id="applied-2"), pytest.param((1, 2, "no room"), id="failed-2")],
)
@pytest.mark.parametrize("root_expired", [False, True], ids=["root-valid", "root-expired"])
def test_a_device_from_the_document_decides_like_the_reference_core(
    fleet: Fleet,
    make: Callable[[], bytes],
    finished: tuple[int, int, str | None],
    root_expired: bool,
) -> None:
    applied, failed, error = finished
    expires = NOW - 10 if root_expired else NOW + 3600
    root_bytes = fleet.signed_root(fleet.root(expires=expires))
    payload = make()
    state = AgentState(applied_generation=applied, failed_generation=failed, last_error=error)
    reference = outcome(core("d1", TrustedRoot.from_bytes(root_bytes), state=state), payload, NOW)
    device = doc_device.DocDevice(
        "d1",
        doc_device.load_root(root_bytes),
        allowance_s=0,
        applied_generation=applied,
        failed_generation=failed,
        last_error=error,
    )
    assert device.receive(payload, NOW) == reference


def test_the_document_device_refuses_a_root_not_signed_by_its_own_threshold() -> None:
    root = FLEET.signed_root(FLEET.root(), signers=FLEET.hub_keys)
    with pytest.raises(ValueError, match="own root threshold"):
        doc_device.load_root(root)
    with pytest.raises(ThresholdNotMetError):  # and so does the reference
        TrustedRoot.from_bytes(root)
