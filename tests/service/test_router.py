"""The session router's own bookkeeping, driven without Ray (test_service.py runs it as an
actor): it keeps a lock only for the sessions a call is using."""

import asyncio

from fisedit.service.config import ServiceConfig, StoreConfig
from fisedit.service.router import SessionRouter


def test_the_router_keeps_no_lock_for_sessions_no_call_is_using(tmp_path):
    router = SessionRouter(ServiceConfig(store=StoreConfig(url=str(tmp_path))))

    async def scenario() -> tuple[bool, int, int]:
        async with router._lock("s1"):
            one = router._lock("s1") is router._lock("s1")
            held = len(router._locks)
        for ident in range(1000):  # ids asked about once, e.g. unknown ones
            async with router._lock(f"unknown-{ident}"):
                pass
        return one, held, len(router._locks)

    assert asyncio.run(scenario()) == (True, 1, 0)
