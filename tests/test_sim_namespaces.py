"""A simulated root device is root only in namespaces of its own: it never changes the host.

Against a real simulator over real SSH (asyncssh, OpenSSH's sftp and unmodified Ansible).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from evc_sim import SimDevice
from evc_sim.accounts import running_as_root
from evc_sim.namespaces import UID_BASE, Isolation
from evc_sim.session import sftp_server
from tests.fixtures.sim import MakeDevices, connect, run_ansible

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not running_as_root(), reason="a simulated root device needs the tests to run as root"),
]


async def _run(dev: SimDevice, key: Path, *commands: str) -> list[tuple[int, str, str]]:
    """Each command in its own session (a new process from the device's spawner), in order."""
    out = []
    async with await connect(dev, key) as conn:
        for command in commands:
            res = await conn.run(command, check=False)
            out.append((res.exit_status, str(res.stdout), str(res.stderr)))
    return out


def test_root_device_writes_etc_and_usr_in_its_own_view_only(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev, other = sim_devices(2, privilege="root")
    marker = f"evc-sim-marker-{secrets.token_hex(6)}"
    etc, usr, top = Path("/etc") / marker, Path("/usr/local") / marker, Path("/") / marker
    try:
        results = asyncio.run(
            _run(
                dev, evc_key_path,
                "id -u",
                f"echo x > {etc} && mkdir -p /usr/local && echo y > {usr}",
                f"cat {etc} {usr}",
                "hostname",
                "cd && pwd && echo h > home-file && ls -ln home-file",
                f"touch {top}; cat /proc/self/uid_map",
            )
        )  # fmt: skip
        other_sees = asyncio.run(_run(other, evc_key_path, f"cat {etc}"))[0]
        assert results[0] == (0, "0\n", "")  # root on the device: what the registration probe checks
        assert results[1][0] == 0, results[1]
        assert results[2] == (0, "x\ny\n", ""), results[2]  # the next command sees what the last wrote
        assert results[3][1].strip() == dev.name
        pwd, listing = results[4][1].splitlines()
        assert pwd == str(dev.home)  # the home is the one the simulator serves, root's inside
        assert listing.split()[2:4] == ["0", "0"]
        assert (dev.home / "home-file").stat().st_uid == 0  # and the host's root's outside
        # root in a user namespace of its own: an unprivileged uid of the host
        rc, out, err = results[5]
        assert "Permission denied" in err
        assert out.split() == ["0", str(UID_BASE), "65536"]
        assert other_sees[0] != 0  # another device has its own /etc
        assert not etc.exists() and not usr.exists()  # the host is untouched
        assert socket.gethostname() != dev.name
    finally:
        for p in (etc, usr, top):
            p.unlink(missing_ok=True)


@pytest.mark.skipif(sftp_server() is None, reason="OpenSSH's sftp-server is not installed")
def test_root_device_sftp_and_ansible_write_etc_in_its_own_view(
    sim_devices: MakeDevices, evc_key_path: Path, tmp_path: Path
) -> None:
    dev = sim_devices(1, privilege="root")[0]
    marker = f"evc-sim-marker-{secrets.token_hex(6)}"
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        "- hosts: devices\n"
        "  gather_facts: false\n"
        "  tasks:\n"
        f"    - ansible.builtin.copy: {{content: \"from ansible\\n\", dest: /etc/{marker}.conf, mode: \"0600\"}}\n"
        f"    - ansible.builtin.file: {{path: /opt/{marker}, state: directory}}\n"
        "    - ansible.builtin.copy: {content: \"in home\\n\", dest: \"{{ home }}/from-ansible.txt\"}\n"
    )  # fmt: skip
    sftp_put = tmp_path / "put.txt"
    sftp_put.write_text("over sftp\n")
    try:
        res = run_ansible(
            ["ansible-playbook", str(playbook), "-e", f"home={dev.home}"],
            [(dev.name, dev)], evc_key_path, tmp_path,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr

        async def sftp_then_read() -> tuple[list[str], list[tuple[int, str, str]]]:
            async with await connect(dev, evc_key_path) as conn, conn.start_sftp_client() as sftp:
                await sftp.put(str(sftp_put), f"/etc/{marker}.sftp")
                names = await sftp.listdir("/etc")
            return names, await _run(
                dev, evc_key_path, f"cat /etc/{marker}.conf /etc/{marker}.sftp; ls -d /opt/{marker}"
            )

        names, [(rc, out, err)] = asyncio.run(sftp_then_read())
        assert f"{marker}.conf" in names  # SFTP sees the device's /etc, not the host's
        assert (rc, out) == (0, f"from ansible\nover sftp\n/opt/{marker}\n"), err
        assert (dev.home / "from-ansible.txt").read_text() == "in home\n"  # ~ is the real home
        for leaked in (f"/etc/{marker}.conf", f"/etc/{marker}.sftp", f"/opt/{marker}"):
            assert not Path(leaked).exists(), f"{leaked} reached the host"
    finally:
        for p in (f"/etc/{marker}.conf", f"/etc/{marker}.sftp"):
            Path(p).unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", f"/opt/{marker}"], check=False)


def test_isolation_of_a_root_device(tmp_path: Path) -> None:
    from evc_sim.namespaces import isolation_for

    iso = isolation_for("d1", tmp_path / "devices" / "d1", Path("/var/lib/evcsim/sims/x/homes/d1"))
    assert isinstance(iso, Isolation)
    assert [o[0] for o in iso.overlays][:3] == ["/etc", "/usr", "/var"]
    assert iso.keep == ("/var/lib/evcsim/sims/x/homes/d1",)
    assert iso.uid_base == UID_BASE
    assert all(Path(upper).is_dir() and Path(work).is_dir() for _, upper, work in iso.overlays)


def test_state_directory_inside_a_system_directory_is_refused() -> None:
    from evc.errors import ConfigError
    from evc_sim.namespaces import isolation_for

    with pytest.raises(ConfigError, match="inside /var"):
        isolation_for("d1", Path("/var/evc-sim-never-made/devices/d1"), Path("/tmp/home"))
