"""Provisioning overhead: an EVC provision job vs plain ``ansible-playbook``, same inventory.

A three-task playbook (ping, command, stat) over N simulated devices (default 50). Both runs use
the inventory EVC generates for the job (same hosts, keys, known_hosts, ssh options, pipelining)
and the same forks; the EVC run is the provision job's body (what the Celery task runs: gate,
locks, inventory, ansible-runner, every event streamed to Redis, per-host results), timed from
the job's ``started_at`` to its ``finished_at``. One warm-up of each, then alternating rounds;
the figure is the median of the rounds' EVC/plain ratios (the two runs of a round go back to
back, in alternating order, and share the machine's load, which on a shared 2-core machine
swings more than the overhead measured). CPU seconds (this process and its children) are
printed beside. Target: EVC <= 1.15 x plain.

    .venv/bin/python bench/provision_bench.py [--devices 50] [--forks 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from _common import Figure, emit, private_stack, stamp

from evc import keys
from evc.context import Caller, Context
from evc.jobs import JobRun
from evc.model import Device
from evc.provisioning.catalog import Catalog
from evc.provisioning.inventory import job_inventory
from evc.provisioning.runner import PlaybookRun, runner_env
from evc.provisioning.service import ProvisionRequest, provision, submit_provision
from evc.settings import Settings
from evc.store import Store, new_id, now
from evc_sim import SimDevice, read_state

PLAYBOOK = """\
- name: Three tasks
  hosts: all
  gather_facts: false
  tasks:
    - name: Reach the device
      ansible.builtin.ping:
    - name: Run a command
      ansible.builtin.command: uname -m
      changed_when: false
    - name: Look at the home directory
      ansible.builtin.stat:
        path: "~"
"""


class NoBroker:
    """The bench runs the job body itself: nothing is enqueued."""

    def send_task(self, name: str, args: Any = None, **options: Any) -> None:
        return None


def start_simulator(n: int, work: Path, pub: str) -> tuple[subprocess.Popen[bytes], list[SimDevice]]:
    """The simulator in its own process, so that it never shares a GIL with the runs."""
    root = work / "sim"
    root.mkdir(mode=0o711)
    keys_file = work / "authorized_keys"
    keys_file.write_text(pub + "\n")
    state = work / "sim.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc_sim", "--devices", str(n), "--root", str(root),
         "--state-file", str(state), "--authorized-keys", str(keys_file), "--prefix", "bench"],
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not state.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the simulator did not start")
        time.sleep(0.1)
    return proc, read_state(state)


def register(store: Store, devices: list[SimDevice]) -> list[str]:
    ids = []
    for d in devices:
        rec = cast(Device, {  # what registration sets that a playbook run reads
            "id": new_id("dev"), "name": d.name, "host": d.host, "port": d.port,
            "username": d.username, "labels": {"bench": "yes"}, "jump_host": None,
            "state": "online", "host_key": d.host_key_public, "privilege": d.privilege,
            "facts": {}, "cluster_id": None, "level": 0, "created_at": now(),
        })  # fmt: skip
        store.create_device(rec, token_hash=f"bench-{rec['id']}")
        ids.append(rec["id"])
    return ids


def cpu_s() -> float:
    """CPU seconds used so far by this process and the children it waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_evc(store: Store, settings: Settings, ids: list[str], forks: int) -> tuple[float, dict[str, Any]]:
    req = ProvisionRequest.from_dict({"playbook": "bench3", "targets": ids, "forks": forks})
    job, _ = submit_provision(Context(store, settings, NoBroker(), Caller("bench")), req)
    run = JobRun.start(store, job["id"])
    assert run is not None
    summary = provision(store, settings, run)
    run.succeed(summary)
    done = store.get_job(job["id"])
    if done["state"] != "succeeded":
        raise SystemExit(f"EVC job {done['state']}: {done.get('error')} {summary}")
    events = store.events(job["id"], 0, 1_000_000)
    ansible = [e for e in events if e.get("type") == "ansible" and e.get("event") != "status"]
    if [e["counter"] for e in ansible] != list(range(1, summary["events"] + 1)):
        raise SystemExit("not every Ansible event reached the job, in order")
    took = stamp(done["finished_at"], "finished_at") - stamp(done["started_at"], "started_at")
    return took, {"events": len(ansible), "all_events": len(events)}


def run_plain(store: Store, settings: Settings, ids: list[str], forks: int, work: Path) -> float:
    """ansible-playbook on the inventory EVC generates for the same devices, same forks."""
    spec = Catalog.from_settings(settings).get("bench3")
    devices = store.get_devices(ids)
    with job_inventory(devices, settings.key_path, "plain") as inv:
        env = {**os.environ, **runner_env(PlaybookRun(spec.path, inv, "plain"))}
        cmd = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inv.inventory_path),
               "-e", f"@{inv.internal_vars_path}", "--forks", str(forks), str(spec.path)]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, cwd=spec.path.parent, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, check=False)  # fmt: skip
        elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"ansible-playbook failed ({res.returncode}): {res.stderr[-2000:]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--forks", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="evc-pbench-"))
    work.chmod(0o755)
    books = work / "playbooks"
    books.mkdir()
    (books / "bench3.yml").write_text(PLAYBOOK)
    redis, settings = private_stack(work)
    settings = settings.replace(playbook_dirs=str(books), ansible_forks=args.forks)
    keys.ensure_keypair(settings)
    store = Store.from_settings(settings)
    sim, devices = start_simulator(args.devices, work, keys.public_key(settings))
    try:
        ids = register(store, devices)
        print(f"{len(ids)} simulated devices, forks {args.forks}, {args.rounds} rounds (after a warm-up)")
        run_plain(store, settings, ids, args.forks, work)
        run_evc(store, settings, ids, args.forks)
        plain: list[float] = []
        evc: list[float] = []
        cpu_plain: list[float] = []
        cpu_evc: list[float] = []
        info: dict[str, Any] = {}
        for i in range(args.rounds):
            for which in ("plain", "evc") if i % 2 == 0 else ("evc", "plain"):  # alternate who goes first
                c0 = cpu_s()
                if which == "plain":
                    plain.append(run_plain(store, settings, ids, args.forks, work))
                    cpu_plain.append(cpu_s() - c0)
                else:
                    t, info = run_evc(store, settings, ids, args.forks)
                    evc.append(t)
                    cpu_evc.append(cpu_s() - c0)
            print(
                f"  round {i + 1}: plain {plain[-1]:6.2f} s ({cpu_plain[-1]:6.2f} CPU s)   "
                f"EVC {evc[-1]:6.2f} s ({cpu_evc[-1]:6.2f} CPU s)   ratio {evc[-1] / plain[-1]:.3f}"
            )
        mp, me = statistics.median(plain), statistics.median(evc)
        ratio = statistics.median(e / p for e, p in zip(evc, plain, strict=True))
        print(f"plain ansible-playbook  median {mp:.2f} s, {statistics.median(cpu_plain):.2f} CPU s")
        print(
            f"EVC provision job       median {me:.2f} s, {statistics.median(cpu_evc):.2f} CPU s "
            f"({info['events']} Ansible events streamed, {info['all_events']} job events)"
        )
        emit(
            [
                Figure("EVC job / plain ansible-playbook", "<= 1.15", ratio, "x", ratio <= 1.15, ratio),
                Figure(f"plain ansible-playbook, {len(ids)} devices (median)", "-", mp, "s", True),
                Figure(f"EVC provision job, {len(ids)} devices (median)", "-", me, "s", True),
            ]
        )
        return 0 if ratio <= 1.15 else 1
    finally:
        os.killpg(sim.pid, signal.SIGTERM)
        sim.wait(30)
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
