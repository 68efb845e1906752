"""Names of the service's actors in their Ray namespace."""

import re

ROUTER = "router"
JOB_QUEUE = "jobs"


def worker_name(index: int) -> str:
    return f"worker-{index}"


def is_worker_name(name: str) -> bool:
    return re.fullmatch(r"worker-\d+", name) is not None
