"""What an enrollment token may register: the labels it fixes and the networks it may target.

By default a device registered with an enrollment token may not be (or sit behind a jump host
that is) on loopback, link-local, unspecified or multicast addresses, nor be the controller
itself: EVC would otherwise open SSH connections to its own services on the registrant's
behalf. An enrollment may list ``allow_networks`` (CIDRs): then every address must be inside
one of them; a special address is allowed only by a network inside its special range (e.g.
``127.0.0.0/8`` for the simulator on loopback, never ``0.0.0.0/0``), the controller's own
address only by naming it exactly (``/32`` or ``/128``). Operator tokens are not limited."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from evc.errors import Forbidden, ValidationError

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: special ranges an enrollment never reaches unless a network inside the range allows it
SPECIAL: tuple[tuple[str, Network], ...] = (
    ("loopback", ipaddress.ip_network("127.0.0.0/8")),
    ("loopback", ipaddress.ip_network("::1/128")),
    ("link-local", ipaddress.ip_network("169.254.0.0/16")),
    ("link-local", ipaddress.ip_network("fe80::/10")),
    ("unspecified", ipaddress.ip_network("0.0.0.0/8")),
    ("unspecified", ipaddress.ip_network("::/128")),
    ("multicast", ipaddress.ip_network("224.0.0.0/4")),
    ("multicast", ipaddress.ip_network("ff00::/8")),
)


def parse_networks(values: Iterable[str]) -> list[Network]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError as exc:
            raise ValidationError(f"allow_networks: {v!r} is not a CIDR network", field="allow_networks") from exc
    return out


def _plain(ip: IP) -> IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_controller(ip: IP) -> bool:
    """True when *ip* is one of this machine's own addresses (it can bind to it)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError:
        return False


def refusal(ip: IP, allow: list[Network], controller: bool) -> str | None:
    """Why an enrollment limited to *allow* (empty: any ordinary address) may not target *ip*."""
    ip = _plain(ip)
    kind = next((k for k, net in SPECIAL if ip in net), None)
    if allow:
        inside = [n for n in allow if n.version == ip.version and ip in n]
        if not inside:
            return f"{ip} is outside the networks this enrollment allows ({', '.join(map(str, allow))})"
        if kind:
            special = [net for k, net in SPECIAL if ip in net]
            if not any(n.subnet_of(s) for n in inside for s in special if n.version == s.version):  # type: ignore[arg-type]
                return f"{ip} is a {kind} address: allow it with a network inside that range (e.g. 127.0.0.0/8)"
            return None
        if controller and not any(n.num_addresses == 1 for n in inside):
            return f"{ip} is this controller's own address: allow it by naming it exactly ({ip}/{ip.max_prefixlen})"
        return None
    if kind:
        return f"{ip} is a {kind} address; an enrollment must list it in allow_networks to register it"
    if controller:
        return f"{ip} is this controller's own address"
    return None


def resolve(host: str) -> list[IP]:
    """Every address *host* resolves to now (an IP literal is itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise ValidationError(f"cannot resolve host {host!r}: {exc}", field="host") from exc
    return sorted({ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos}, key=str)


def check_registration(enrollment: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, str]:
    """Refuse (403) a registration the enrollment does not cover; return the device's labels.

    The enrollment's labels win: the registrant may add labels, never change one it sets. Every
    address EVC would connect to (the host, and the jump host when there is one) is checked as
    resolved now."""
    fixed = dict(enrollment.get("labels") or {})
    given = dict(data.get("labels") or {})
    clash = sorted(k for k in given if k in fixed and given[k] != fixed[k])
    if clash:
        raise Forbidden(
            f"labels {clash} are set by the enrollment token and cannot be overridden", field="labels", labels=clash
        )
    allow = parse_networks(enrollment.get("allow_networks") or [])
    hosts: list[tuple[str, str]] = [("host", str(data["host"]))]
    if data.get("jump_host"):
        hosts.append(("jump_host.host", str(data["jump_host"]["host"])))
    for where, host in hosts:
        for ip in resolve(host):
            why = refusal(ip, allow, is_controller(_plain(ip)))
            if why:
                raise Forbidden(f"this enrollment token cannot register {where} {host}: {why}", field=where)
    return {**given, **fixed}
