"""Fixtures of the service tests."""

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest


@contextmanager
def _in_own_process_group(
    command: list[str], grace_s: float = 60, **popen
) -> Iterator[subprocess.Popen]:
    """Runs `command` in a new process group, and stops the whole group on exit: SIGTERM,
    then SIGKILL if it has not ended within `grace_s`. (`ray stop` would stop every Ray on
    the machine, not just the one the command started.)"""
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)


@pytest.fixture(scope="session")
def process_group() -> Callable[..., AbstractContextManager[subprocess.Popen]]:
    """`process_group(command, grace_s=60, **popen)`: a context manager that runs a command
    in its own process group and stops the group when it exits."""
    return _in_own_process_group
