"""Pure rules of changing a device's connection details (which keys stay pinned)."""

from __future__ import annotations

from evc.connections import new_connection, target_summary

DEV = {
    "host": "10.0.0.5", "port": 22, "username": "edge", "host_key": "ssh-ed25519 DEV",
    "jump_host": {"host": "bastion", "port": 2222, "username": "hop", "host_key": "ssh-ed25519 JUMP"},
}  # fmt: skip


def test_same_address_keeps_the_pins() -> None:
    out = new_connection(DEV, {"username": "pi"})
    assert out["username"] == "pi" and out["host_key"] == "ssh-ed25519 DEV"
    assert out["jump_host"]["host_key"] == "ssh-ed25519 JUMP"
    out = new_connection(DEV, {"jump_host": {"host": "bastion", "port": 2222, "username": "other"}})
    assert out["jump_host"] == {"host": "bastion", "port": 2222, "username": "other", "host_key": "ssh-ed25519 JUMP"}


def test_new_address_is_learned_and_a_given_key_is_pinned() -> None:
    assert new_connection(DEV, {"port": 2200})["host_key"] is None
    assert new_connection(DEV, {"host": "10.0.0.6", "host_key": "ssh-ed25519 NEW"})["host_key"] == "ssh-ed25519 NEW"
    jump = new_connection(DEV, {"jump_host": {"host": "bastion2", "username": "hop"}})["jump_host"]
    assert jump == {"host": "bastion2", "port": 22, "username": "hop", "host_key": None}
    assert new_connection(DEV, {"jump_host": None})["jump_host"] is None


def test_target_summary() -> None:
    assert target_summary(DEV) == "edge@10.0.0.5:22 via hop@bastion:2222"
    assert target_summary({**DEV, "jump_host": None}) == "edge@10.0.0.5:22"
