"""Devices: records, their name and token indexes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from evc.errors import Conflict, NotFound
from evc.model import Device
from evc.store._base import DEVICE, StoreBase


class DeviceStore(StoreBase):
    def create_device(self, dev: Device, token_hash: str) -> Device:
        name_key = self.k("device-name", dev["name"])
        if not self._redis.set(name_key, dev["id"], nx=True):
            raise Conflict(f"a device named {dev['name']!r} is already registered", field="name")
        dev = {**dev, "token_hash": token_hash}
        self._put(DEVICE, dev)
        self._redis.set(self.k("device-token", token_hash), dev["id"])
        return dev

    def get_device(self, device_id: str) -> Device:
        return self._get(DEVICE, device_id)

    def device_id_by_name(self, name: str) -> str | None:
        dev_id = self._redis.get(self.k("device-name", name))
        return dev_id.decode() if dev_id else None

    def get_devices(self, ids: Iterable[str]) -> list[Device]:
        return self._get_many(DEVICE, ids)

    def update_device(self, device_id: str, **changes: Any) -> Device:
        return self._update(DEVICE, device_id, changes)

    def rename_device(self, device_id: str, old: str, new: str) -> None:
        """Move the device's name index from *old* to *new* (Conflict when *new* is taken)."""
        if not self._redis.set(self.k("device-name", new), device_id, nx=True):
            raise Conflict(f"a device named {new!r} is already registered", field="name")
        self._redis.delete(self.k("device-name", old))

    def device_by_token(self, token_hash: str) -> Device | None:
        dev_id = self._redis.get(self.k("device-token", token_hash))
        if not dev_id:
            return None
        try:
            return self.get_device(dev_id.decode())
        except NotFound:
            return None

    def device_ids(self) -> list[str]:
        return list(self._ids(DEVICE, newest_first=False))

    def list_devices(
        self, offset: int = 0, limit: int = 50, match: Callable[[Device], bool] | None = None
    ) -> tuple[list[Device], int]:
        return self._page(DEVICE, offset, limit, match, newest_first=False)

    def all_devices(self) -> list[Device]:
        return self._get_many(DEVICE, self.device_ids())

    def delete_device(self, device_id: str) -> Device:
        dev = self.get_device(device_id)
        cluster_id = dev.get("cluster_id")
        if cluster_id:
            self._redis.srem(self.k("cluster", cluster_id, "members"), device_id)
        self._delete(
            DEVICE,
            device_id,
            self.k("device-name", dev["name"]),
            self.k("device-token", dev.get("token_hash", "")),
            self.k("device-cluster", device_id),
            self.k("health-history", device_id),
        )
        return dev
