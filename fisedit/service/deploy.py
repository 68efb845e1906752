"""Start and stop the service's actors on a running Ray cluster: workers, router, job queue.

`fisedit up` / `fisedit down` and the tests call these; every actor is named in the
config's namespace, so any driver (or a Ray Jobs entrypoint) finds them again.
"""

import warnings

import ray
from ray.exceptions import RayTaskError

from fisedit.service.config import ServiceConfig, StoreConfig
from fisedit.service.jobs import JobQueue, root_cause
from fisedit.service.names import JOB_QUEUE, ROUTER, is_worker_name, worker_name
from fisedit.service.router import SessionRouter
from fisedit.service.worker import EditWorker


def start(config: ServiceConfig) -> None:
    """Starts every actor the config names that is not running yet, and waits until the
    workers have loaded the model. The actors are detached: they outlive the driver that
    started them, until `stop` (or the cluster's end). A store that is missing or out of
    reach fails here, naming it, before any actor starts."""
    # Checked on the cluster, as the actors will use it: the driver may lack its credentials.
    checked = ray.remote(num_cpus=0)(_check_store).remote(config.store)
    try:
        ray.get(checked, timeout=config.call_timeout_s)
    except RayTaskError as error:
        raise root_cause(error) from error
    common = {"namespace": config.namespace, "get_if_exists": True, "lifetime": "detached"}
    resources = config.worker_resources
    warn_if_unoffered(resources.model_dump(), "the workers")
    starting = {worker_name(i) for i in range(config.workers)} - set(running(config.namespace))
    warn_if_no_room(resources.model_dump(), len(starting), "workers")
    workers = [
        ray.remote(EditWorker)
        .options(
            name=worker_name(index),
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            resources=resources.resources,
            max_restarts=-1,
            **common,
        )
        .remote(config, worker_name(index))
        for index in range(config.workers)
    ]
    router, queue = (
        ray.remote(actor).options(name=name, num_cpus=0, max_restarts=-1, **common).remote(config)
        for name, actor in ((ROUTER, SessionRouter), (JOB_QUEUE, JobQueue))
    )
    # The router maps what the workers hold, the queue resumes unfinished jobs.
    ready = [*(worker.health.remote() for worker in workers), router.stats.remote()]
    ray.get([*ready, queue.list_jobs.remote()], timeout=config.call_timeout_s)


def _check_store(store: StoreConfig) -> None:
    store.open().check()


def _wanted(options: dict) -> dict[str, float]:
    """An actor's `options` (num_cpus, num_gpus, resources) as Ray names the resources."""
    wanted = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0)}
    return wanted | (options.get("resources") or {})


def warn_if_unoffered(options: dict, actors: str) -> None:
    """Says which resources of an actor's `options` (num_cpus, num_gpus, resources) no node
    of the cluster offers enough of: `actors` would wait for a node that does (which an
    autoscaler may add), and calls on them time out."""
    wanted = _wanted(options)
    offered = ray.cluster_resources()
    missing = [name for name, amount in wanted.items() if amount > offered.get(name, 0)]
    if missing:
        has = ", ".join(sorted(n for n in offered if not n.startswith("node:")))
        warnings.warn(
            f"worker_resources: no node of this cluster offers {', '.join(missing)} (it has "
            f"{has}); {actors} wait for one that does",
            stacklevel=3,
        )


def room_for(options: dict, resources: dict[str, float]) -> int | None:
    """How many actors with `options` the `resources` hold (None: no limit)."""
    wanted = _wanted(options).items()
    return min(
        (int(resources.get(name, 0) // amount) for name, amount in wanted if amount), default=None
    )


def room_warning(
    options: dict, count: int, actors: str, offered: dict[str, float], available: dict[str, float]
) -> str | None:
    """What `warn_if_no_room` says, given the cluster's `offered` and `available` resources."""
    now, most = room_for(options, available), room_for(options, offered)
    if now is None or now >= count or most == 0:
        return None  # room, or none on any node (`warn_if_unoffered` says so)
    wanted = {name: amount for name, amount in _wanted(options).items() if amount}
    each = ", ".join(f"{amount:g} {name}" for name, amount in wanted.items())
    free = ", ".join(f"{available.get(name, 0):g} {name}" for name in wanted)
    why = (
        f"the cluster holds at most {most} at once, so the rest wait for more nodes"
        if most < count
        else "the rest wait until other actors, such as the service's workers, release "
        "what they hold"
    )
    return f"room now for {now} of the {count} {actors} ({each} each, {free} free): {why}"


def warn_if_no_room(options: dict, count: int, actors: str) -> None:
    """Says when the cluster has room now for fewer than `count` actors with `options`,
    and why they wait: other actors hold what they need, or no more fit."""
    message = room_warning(
        options, count, actors, ray.cluster_resources(), ray.available_resources()
    )
    if message is not None:
        warnings.warn(message, stacklevel=3)


def running(namespace: str) -> list[str]:
    """The service's live actors in `namespace`: router, job queue and every worker, however
    many workers the config that started them named."""
    names = {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == namespace
    }
    return [n for n in (ROUTER, JOB_QUEUE) if n in names] + sorted(filter(is_worker_name, names))


def stop(config: ServiceConfig, drain: bool = False) -> None:
    """Kills the service's actors in the config's namespace, every worker included (the job
    records stay in the store). With `drain`, each live worker first snapshots the sessions
    it holds, so they restore elsewhere later."""
    names = running(config.namespace)
    undrained = []  # a failed drain stops nothing: every committed version is in the store
    if drain:
        for name in filter(is_worker_name, names):
            try:
                worker = ray.get_actor(name, namespace=config.namespace)
            except ValueError:
                continue  # gone since
            try:
                ray.get(worker.drain.remote(), timeout=config.call_timeout_s)
            except Exception as error:
                undrained.append(f"{name}: {error}")
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=config.namespace), no_restart=True)
        except ValueError:
            continue
    if undrained:
        raise RuntimeError(
            "stopped, but not every session was snapshotted first (those are recomputed "
            f"from their recipes when next used): {'; '.join(undrained)}"
        )
