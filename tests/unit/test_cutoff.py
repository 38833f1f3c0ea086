"""The broker cut-off's pure parts: the commands sent, and what an answer confirms."""

from __future__ import annotations

import json

import pytest

from hub.enrollment.cutoff import commands, read_answer


def test_each_device_is_created_then_deleted_which_kicks_it_and_leaves_nothing() -> None:
    sent = json.loads(commands(["pump-1", "pump-2"]))["commands"]
    assert [(c["command"], c["username"]) for c in sent] == [
        ("createClient", "pump-1"),
        ("deleteClient", "pump-1"),
        ("createClient", "pump-2"),
        ("deleteClient", "pump-2"),
    ]
    assert all("password" not in c for c in sent)  # never a way in, not even briefly


def test_an_answer_confirms_each_successful_delete_and_names_failures() -> None:
    answer = read_answer(
        json.dumps(
            {
                "responses": [
                    {"command": "createClient", "error": "Client already exists"},
                    {"command": "deleteClient", "correlationData": "driftless-cutoff:pump-1"},
                    {
                        "command": "deleteClient",
                        "correlationData": "driftless-cutoff:pump-2",
                        "error": "Client not found",
                    },
                    {"command": "deleteClient", "correlationData": "someone-else"},
                    "garbage",
                ]
            }
        ).encode()
    )
    assert answer.cut_off == ["pump-1"]
    assert answer.failed == {"pump-2": "Client not found"}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"other": 1}', id="no-responses"),
    ],
)
def test_what_is_not_a_dynsec_response_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="not a dynamic security response"):
        read_answer(payload)
