"""Reading a fleet from an Ansible inventory (parsed by Ansible itself) or a CSV: pure, no I/O."""

from __future__ import annotations

import pytest

from evc.errors import ValidationError
from evc.inventory_import import detect_format, jump_host_of, parse

INI = """
[edge]
cam-1 ansible_host=10.0.0.5 ansible_port=2222
cam-2 ansible_host=10.0.0.6 evc_labels="{'site': 'lab'}"

[edge:vars]
ansible_user=pi
ansible_ssh_common_args='-o StrictHostKeyChecking=yes -o ProxyJump=ops@bastion.example:2200'

[gpu]
cam-2
bad ansible_port=notaport ansible_user=x
nouser ansible_host=10.0.0.9
"""

YAML = """
all:
  vars:
    ansible_user: root
  children:
    edge:
      vars: {ansible_user: pi}
      hosts:
        a: {ansible_host: 127.0.0.1, ansible_port: 2201}
        b: {ansible_host: "{{ lookup('pipe', 'id') }}", ansible_ssh_common_args: "-J ops@[::1]:2022"}
    core:
      hosts:
        c: {ansible_host: 10.1.0.1}
"""


def test_ini_inventory_hosts_groups_vars_and_jump_host() -> None:
    inv = parse(INI)
    by_name = {e.name: e for e in inv.entries}
    assert set(by_name) == {"cam-1", "cam-2"}
    cam1, cam2 = by_name["cam-1"], by_name["cam-2"]
    assert (cam1.host, cam1.port, cam1.username) == ("10.0.0.5", 2222, "pi")
    assert cam1.labels == {"edge": "true"}
    assert cam1.jump_host == {"username": "ops", "host": "bastion.example", "port": 2200}
    assert cam2.labels == {"edge": "true", "gpu": "true", "site": "lab"}
    reasons = {p.name: p.reason for p in inv.problems}
    assert "not a number" in reasons["bad"]
    assert "ansible_user" in reasons["nouser"]


def test_yaml_inventory_group_vars_override_all_and_nothing_is_templated() -> None:
    inv = parse(YAML)
    by_name = {e.name: e for e in inv.entries}
    assert by_name["a"].username == "pi" and by_name["a"].port == 2201
    assert by_name["c"].username == "root" and by_name["c"].labels == {"core": "true"}
    assert by_name["b"].host == "{{ lookup('pipe', 'id') }}"  # raw: the API refuses it as a host name
    assert by_name["b"].jump_host == {"username": "ops", "host": "::1", "port": 2022}


def test_default_user_fills_in_where_the_inventory_names_none() -> None:
    inv = parse("[edge]\nnouser ansible_host=10.0.0.9\n", default_user="evc")
    assert [(e.name, e.username) for e in inv.entries] == [("nouser", "evc")]


def test_csv_inventory() -> None:
    text = (
        "name,host,port,user,labels,jump\n"
        "cam-1,10.0.0.5,2222,pi,site=lab;role=cam,ops@bastion:2200\n"
        "cam-2,10.0.0.6,,pi,,\n"
    )
    inv = parse(text, filename="fleet.csv")
    cam1, cam2 = inv.entries
    assert (cam1.name, cam1.host, cam1.port, cam1.username) == ("cam-1", "10.0.0.5", 2222, "pi")
    assert cam1.labels == {"site": "lab", "role": "cam"}
    assert cam1.jump_host == {"username": "ops", "host": "bastion", "port": 2200}
    assert (cam2.port, cam2.labels, cam2.jump_host) == (22, {}, None)
    with pytest.raises(ValidationError, match="header"):
        parse("cam-1,10.0.0.5\n", fmt="csv")


def test_format_detection_and_unreadable_inventories() -> None:
    assert detect_format("", "x.csv") == "csv"
    assert detect_format(YAML) == "yaml"
    assert detect_format(INI) == "ini"
    with pytest.raises(ValidationError, match="cannot read the inventory as yaml"):
        parse("all:\n  hosts: [1, 2]\n", fmt="yaml")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("-o ProxyJump=ops@j", {"username": "ops", "host": "j", "port": 22}),
        ("-o 'ProxyJump ops@j:2'", {"username": "ops", "host": "j", "port": 2}),
        ("-oProxyJump=ops@j:2", {"username": "ops", "host": "j", "port": 2}),
        ("-J ssh://ops@[fe80::1]:22", {"username": "ops", "host": "fe80::1", "port": 22}),
        ("-o StrictHostKeyChecking=no", None),
        ("-o ProxyJump=none", None),
    ],
)
def test_jump_host_of_openssh_arguments(args: str, expected: object) -> None:
    assert jump_host_of(args) == expected


@pytest.mark.parametrize(
    ("args", "match"),
    [("-J a@j1,b@j2", "chain"), ("-o ProxyCommand='nc %h %p'", "ProxyCommand"), ("-J j", "needs a user")],
)
def test_jump_hosts_evc_cannot_follow_are_refused(args: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        jump_host_of(args)
