"""Waiting, with a deadline, for something another process or thread does."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float, interval: float = 0.1) -> T:
    """Calls `condition` until it returns something true, and returns that; fails naming
    `what` after `timeout` seconds. A `condition` that asserts fails the wait at once (a
    process that ended early, a call that returned first)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(interval)
    return value
