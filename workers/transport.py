"""kombu's Redis transport with one publishing client per channel.

kombu builds a new ``redis.Redis`` object for every publish; with redis-py 8 that costs about
0.35 ms (its response-callback table is rebuilt each time), which is a quarter of the API's
budget per job submission. The client is stateless over a shared connection pool, so one per
channel serves every publish."""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kredis


class Channel(kredis.Channel):
    _evc_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._evc_client is None:
            self._evc_client = super()._create_client(asynchronous=False)
        return self._evc_client


class Transport(kredis.Transport):
    Channel = Channel
