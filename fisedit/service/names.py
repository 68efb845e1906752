"""Names of the service's actors in their Ray namespace."""

ROUTER = "router"
JOB_QUEUE = "jobs"


def worker_name(index: int) -> str:
    return f"worker-{index}"
