"""The service on a real local Ray (CPU, two workers on a custom resource, tiny model):
affinity, stale versions, bad input, jobs, idempotency, cancellation, and failover."""

import io
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from polling import wait_until
from pydantic import ValidationError

from fisedit.engine.config import EditConfig, EngineConfig
from fisedit.engine.session import StepCallback
from fisedit.service import Client, deploy
from fisedit.service.config import (
    QueueLimits,
    RetryPolicy,
    ServiceConfig,
    StoreConfig,
    WorkerResources,
)
from fisedit.service.jobs import ChainSpec, JobRecord, UnknownJobError
from fisedit.service.names import JOB_QUEUE, ROUTER, worker_name
from fisedit.service.results import EditRequest, StaleVersionError
from fisedit.storage import StoreNotFoundError

STEPS = 4
TIMEOUT = 240
CHAIN = ["a dog on a bench", "a dog on a red bench", "a fox on a red bench", "a fox at night"]


def _config(tiny_model_dir: str, store: StoreConfig, workers: int) -> ServiceConfig:
    return ServiceConfig(
        model=tiny_model_dir,
        engine=EngineConfig(progress=False, edit=EditConfig(mask_steps=1)),
        store=store,
        namespace=f"test-{uuid.uuid4().hex[:8]}",
        workers=workers,
        worker_resources=WorkerResources(num_cpus=1, resources={"edit_slot": 1}),
        retry=RetryPolicy(attempts=6, backoff_s=0.2),
        queue=QueueLimits(migrate_above=0, kept_finished_jobs=2),
        call_timeout_s=TIMEOUT,
    )


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """One local Ray for the module; its workers inherit the S3 endpoint's credentials."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=4,
            resources={"edit_slot": 3},  # two workers here, one on S3
            object_store_memory=200 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def config(ray_cluster, tiny_model_dir, tmp_path_factory) -> ServiceConfig:
    config = _config(tiny_model_dir, StoreConfig(url=str(tmp_path_factory.mktemp("store"))), 2)
    deploy.start(config)
    yield config
    deploy.stop(config)


@pytest.fixture(scope="module")
def client(config) -> Client:
    return Client(config=config, timeout_s=TIMEOUT)


def _chain(prompts=CHAIN, **fields) -> dict:
    return {"prompt": "a cat on a bench", "steps": STEPS, "seed": 5, **fields} | {
        "edits": [{"prompt": p} for p in prompts]
    }


def _image(client: Client, key: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(client.read(key))))


def test_follow_up_edits_hit_the_worker_that_holds_the_session(client):
    made = client.generate("a cat on a bench", steps=STEPS, seed=1)
    first = client.edit(made.session_id, "a dog on a bench", extends=0)
    second = client.edit(made.session_id, "a dog on a red bench", extends=1)

    assert [first.cache_path, second.cache_path] == ["hit", "hit"]
    assert made.worker_id == first.worker_id == second.worker_id
    assert [r.version for r in client.history(made.session_id)] == [0, 1, 2]
    assert _image(client, second.image_key).shape == (128, 128, 3)
    assert 0 < second.mask_ratio <= 1 and 0 < second.mac_fraction < 1


def test_a_snapshot_on_request_lands_in_the_store(client, config):
    made = client.generate("a cat on a bench", steps=STEPS, seed=6)
    client.edit(made.session_id, "a dog on a bench", extends=0)

    key = client.snapshot(made.session_id)

    assert key == f"sessions/{made.session_id}/v1/manifest.json"
    assert config.store.open(f"tenants/{config.tenant}").exists(key)


def _held_at_first_step(started: Path, release: Path) -> StepCallback:
    """An `on_step` that keeps its edit in flight: it marks the edit as started, then
    waits at the first step until the test releases it. Files, since it runs on a worker;
    nested, so that Ray pickles it by value (a worker cannot import the test module)."""

    def on_step(done: int, total: int) -> None:
        started.touch()
        deadline = time.monotonic() + TIMEOUT
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    return on_step


def _wait_for(path: Path, call: ray.ObjectRef) -> None:
    """Waits for `path`; a call that ends first raises its error (or names its result)."""

    def appeared() -> bool:
        if path.exists():
            return True
        done, _ = ray.wait([call], timeout=0.05)
        assert not done, f"the call ended before {path.name}: {ray.get(call)}"
        return False

    wait_until(appeared, path.name, TIMEOUT, interval=0)


def test_an_edit_moves_off_a_busy_holder_when_a_snapshot_makes_it_cheap(client, config, tmp_path):
    # Of three new sessions two share a worker.
    made = [client.generate("a cat", steps=STEPS, seed=30 + i) for i in range(3)]
    busy, moved = next(
        (a, b) for a in made for b in made if a is not b and a.worker_id == b.worker_id
    )
    client.snapshot(moved.session_id)
    router = ray.get_actor(ROUTER, namespace=config.namespace)
    started, release = tmp_path / "started", tmp_path / "release"

    request = EditRequest(prompt="a dog", extends=0)
    running = router.edit.remote(busy.session_id, request, _held_at_first_step(started, release))
    _wait_for(started, running)  # the holder is busy until the test releases it
    try:
        edited = client.edit(moved.session_id, "a fox", extends=0)
    finally:
        release.touch()

    assert (edited.cache_path, edited.version) == ("restore", 1)
    assert edited.worker_id != moved.worker_id
    assert ray.get(running, timeout=TIMEOUT).cache_path == "hit"
    assert client.edit(moved.session_id, "a red fox", extends=1).cache_path == "hit"


def _settled_cache_bytes(workers: list[ray.actor.ActorHandle]) -> dict[str, int]:
    """Each worker's cache bytes once none has a call queued: the router does not wait for
    the drop it sends a former holder, so until that runs the holder's figure is stale."""

    def idle_stats() -> list[dict] | None:
        stats = ray.get([w.stats.remote() for w in workers], timeout=TIMEOUT)
        return None if any(s["queued"] for s in stats) else stats

    stats = wait_until(idle_stats, "idle workers", TIMEOUT)
    return {s["worker_id"]: s["cache_bytes"] for s in stats}


def test_new_sessions_go_to_the_worker_with_the_fewest_cache_bytes(client, config):
    workers = [ray.get_actor(worker_name(i), namespace=config.namespace) for i in range(2)]
    placed = []
    for seed in range(2):
        load = _settled_cache_bytes(workers)
        expected = min(load, key=lambda w: (load[w], w))
        placed.append((client.generate("a cat", steps=STEPS, seed=seed).worker_id, expected))
    assert [worker for worker, _ in placed] == [expected for _, expected in placed]


def test_a_stale_version_is_refused_and_nothing_is_applied(client):
    made = client.generate("a cat on a bench", steps=STEPS, seed=2)
    client.edit(made.session_id, "a dog on a bench", extends=0)

    with pytest.raises(StaleVersionError, match="at version 1, not 0"):
        client.edit(made.session_id, "a fox on a bench", extends=0)

    assert [r.version for r in client.history(made.session_id)] == [0, 1]


def test_a_router_behind_its_worker_learns_the_version_from_the_store(client, config):
    made = client.generate("a cat on a bench", steps=STEPS, seed=3)
    # What an edit that timed out at the router, then committed on its worker, leaves.
    holder = ray.get_actor(made.worker_id, namespace=config.namespace)
    request = EditRequest(prompt="a dog on a bench", extends=0)
    ray.get(holder.edit.remote(made.session_id, request), timeout=TIMEOUT)

    with pytest.raises(StaleVersionError, match="at version 1, not 0"):
        client.edit(made.session_id, "a fox on a bench")
    edited = client.edit(made.session_id, "a fox on a bench", extends=1)

    assert (edited.version, edited.cache_path) == (2, "hit")


def test_a_chain_goes_on_from_an_edit_that_changed_nothing(client):
    prompts = ["a dog on a bench", "a dog on a bench", "a fox on a bench"]
    record = client.wait(client.submit_chain(_chain(prompts)), timeout=TIMEOUT)

    assert record.state == "succeeded", record.error
    assert [r.version for r in record.results] == [1, 1, 2]
    assert [r.report.prompt for r in client.history(record.session_id)] == [
        "a cat on a bench", "a dog on a bench", "a fox on a bench"
    ]  # fmt: skip


def test_an_edit_of_an_older_version_branches_off_it_as_a_fresh_session_would(client):
    made = client.generate("a cat on a bench", steps=STEPS, seed=6)
    client.edit(made.session_id, "a dog on a bench", extends=0)
    fresh = client.generate("a cat on a bench", steps=STEPS, seed=6)
    expected = client.edit(fresh.session_id, "a fox on a bench")

    branch = client.edit(made.session_id, "a fox on a bench", extends=1, from_version=0)
    unchanged = client.edit(made.session_id, "A cat on a bench", extends=2, from_version=0)
    # A chain from version 1: its first edit changes nothing, its second edits version 1.
    chain = {"session_id": made.session_id, "from_version": 1, "edits": [
        {"prompt": "a dog on a bench"}, {"prompt": "a dog at night"}
    ]}  # fmt: skip
    record = client.wait(client.submit_chain(chain), timeout=TIMEOUT)

    assert (branch.version, branch.report.base_version) == (2, 0)
    assert np.array_equal(_image(client, branch.image_key), _image(client, expected.image_key))
    assert unchanged.version == 0  # version 0 itself: nothing to edit
    assert record.state == "succeeded", record.error
    assert [(r.version, r.report.base_version) for r in record.results] == [(1, 0), (3, 1)]
    history = client.history(made.session_id)
    assert [r.report.base_version for r in history] == [None, 0, 0, 1]
    with pytest.raises(ValueError, match="from_version: session .* versions 0 to 3, not 9"):
        client.edit(made.session_id, "a fox", from_version=9)
    with pytest.raises(ValueError, match="from_version: session .* versions 0 to 3, not 4"):
        client.submit_chain(chain | {"from_version": 4})
    with pytest.raises(ValidationError, match="from_version: give it with session_id"):
        client.submit_chain(_chain(from_version=0))
    assert len(client.history(made.session_id)) == 4


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"steps": 0}, "steps"),
        ({"edits": [{"prompt": ""}]}, "edits.0.prompt"),
        ({"edits": [{"prompt": "a dog", "mask_key": "../x"}]}, "edits.0.mask_key"),
        ({"session_id": "a/b", "prompt": None}, "session_id"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_specs_fail_fast_naming_the_field(client, change, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        client.submit_chain(_chain() | change)


def test_unknown_models_and_sessions_are_refused_at_submission(client):
    with pytest.raises(ValueError, match="model: unknown model 'sd-99'"):
        client.submit_chain(_chain(model="sd-99"))
    with pytest.raises(ValueError, match="^session_id: unknown session 'nobody'") as refused:
        client.submit_chain({"session_id": "nobody", "edits": [{"prompt": "a dog"}]})
    assert type(refused.value) is ValueError  # the queue's own error, not Ray's wrapper of it


def test_a_chain_with_a_mask_that_is_not_an_image_is_refused_naming_the_edit(client):
    """A chain's edits are checked before it is queued (against the session its
    generation will make): bad input is refused at once, and nothing is queued."""
    spec = _chain() | {"edits": [{"prompt": "a dog"}, {"prompt": "a fox", "mask": b"not a png"}]}
    jobs = {record.job_id for record in client.list_jobs()}

    with pytest.raises(ValueError, match=r"edits\.1\.mask: not a readable image"):
        client.submit_chain(spec)
    assert {record.job_id for record in client.list_jobs()} == jobs


def test_a_chain_job_reports_every_edit(client):
    seen = []
    job = client.submit_chain(_chain(CHAIN[:2]))
    record = client.wait(job, timeout=TIMEOUT, on_progress=lambda r: seen.append(r.progress))

    assert record.state == "succeeded" and record.error is None
    assert [r.version for r in record.results] == [1, 2]
    assert {r.cache_path for r in record.results} == {"hit"}
    for result in record.results:
        assert result.image_key == f"sessions/{record.session_id}/v{result.version}/image.png"
        assert result.mask_key.endswith("mask.png") and result.worker_id.startswith("worker-")
        assert 0 < result.mask_ratio <= 1 and 0 < result.mac_fraction < 1
        assert result.latency_s > 0
    assert seen[-1] == (2, 2)
    kinds = [e.kind for e in record.events]
    assert kinds[:3] == ["queued", "started", "generated"] and kinds[-1] == "succeeded"
    assert client.results(job) == record.results
    assert job in {r.job_id for r in client.list_jobs("succeeded")}


def test_resubmitting_with_the_same_key_returns_the_same_job(client):
    spec = _chain(CHAIN[:1], idempotency_key=f"chain-{uuid.uuid4().hex}")
    job = client.submit_chain(spec)

    assert client.submit_chain(spec) == job
    assert client.wait(job, timeout=TIMEOUT).state == "succeeded"
    assert client.submit_chain(spec) == job
    assert (
        len([r for r in client.list_jobs() if r.spec.idempotency_key == spec["idempotency_key"]])
        == 1
    )


def test_a_cancelled_job_stops_between_edits(client):
    job = client.submit_chain(_chain())
    client.cancel(job)

    record = client.wait(job, timeout=TIMEOUT)
    assert record.state == "cancelled" and len(record.results) < len(CHAIN)
    assert client.cancel(job).state == "cancelled"


def test_a_cancel_stops_the_running_edit_and_the_session_keeps_its_version(client):
    steps = 30  # long enough for the cancel to land while the edit runs
    job = client.submit_chain(_chain(CHAIN[:2], steps=steps))
    client.wait(job, timeout=TIMEOUT, until=lambda r: r.step is not None and r.step.edit == 0)
    client.cancel(job)

    record = client.wait(job, timeout=TIMEOUT)
    assert record.state == "cancelled" and record.results == []
    assert record.events[-1].message == "stopped during its edit 0, not kept"
    assert record.step.edit == 0 and record.step.step < steps
    assert [r.version for r in client.history(record.session_id)] == [0]
    edited = client.edit(record.session_id, CHAIN[0], extends=0)
    assert edited.version == 1 and edited.cache_path == "hit"


def test_finished_jobs_beyond_the_kept_ones_leave_memory_and_are_read_from_the_store(
    client, config
):
    kept = config.queue.kept_finished_jobs
    jobs = [client.submit_chain(_chain(CHAIN[:1], seed=30 + i)) for i in range(kept + 1)]
    records = [client.wait(job, timeout=TIMEOUT) for job in jobs]
    # The two workers run them side by side: the first to finish is the oldest.
    oldest, *newest = sorted(records, key=lambda r: r.events[-1].at)

    wait_until(  # until newer ones are stored
        lambda: oldest.job_id not in {r.job_id for r in client.list_jobs()},
        "oldest finished job gone from memory",
        TIMEOUT,
    )
    assert {r.job_id for r in newest} <= {r.job_id for r in client.list_jobs("succeeded")}
    assert client.status(oldest.job_id) == oldest and oldest.state == "succeeded"


def test_a_restarted_router_finds_the_holders_again(client, config):
    made = client.generate("a cat on a bench", steps=STEPS, seed=8)
    client.edit(made.session_id, "a dog on a bench", extends=0)

    ray.kill(ray.get_actor(ROUTER, namespace=config.namespace), no_restart=False)

    edited = client.edit(made.session_id, "a dog on a red bench", extends=1)
    assert (edited.cache_path, edited.worker_id) == ("hit", made.worker_id)
    with pytest.raises(StaleVersionError):
        client.edit(made.session_id, "a fox", extends=1)


def test_a_restarted_job_queue_resumes_its_jobs_without_repeating_an_edit(client, config):
    job = client.submit_chain(_chain(CHAIN[:3], seed=13))
    client.wait(job, timeout=TIMEOUT, until=lambda r: bool(r.results))

    ray.kill(ray.get_actor(JOB_QUEUE, namespace=config.namespace), no_restart=False)

    record = client.wait(job, timeout=TIMEOUT)
    assert record.state == "succeeded" and [r.version for r in record.results] == [1, 2, 3]
    assert [r.version for r in client.history(record.session_id)] == [0, 1, 2, 3]


def test_a_job_never_takes_another_edit_of_its_session_for_its_own(client, config):
    made = client.generate("a cat on a bench", steps=STEPS, seed=14)
    # A job queued at version 0 that had not run when another edit made version 1: stored
    # by a queue that stopped, resumed by the restarted one.
    spec = ChainSpec(session_id=made.session_id, edits=[{"prompt": "a fox on a bench"}])
    waiting = JobRecord(
        job_id=uuid.uuid4().hex, spec=spec, session_id=made.session_id, base_version=0
    )
    client.edit(made.session_id, "a dog on a bench", extends=0)
    store = config.store.open(f"tenants/{config.tenant}")
    store.put(f"jobs/{waiting.job_id}.json", waiting.model_dump_json().encode())

    ray.kill(ray.get_actor(JOB_QUEUE, namespace=config.namespace), no_restart=False)

    def resumed() -> bool:  # the queue that was killed never knew the job
        try:
            return bool(client.status(waiting.job_id))
        except UnknownJobError:
            return False

    wait_until(resumed, "job resumed by the restarted queue", TIMEOUT)
    record = client.wait(waiting.job_id, timeout=TIMEOUT)
    assert record.state == "failed" and record.results == []
    assert (
        record.error.startswith("StaleVersionError: session")
        and "at version 1, not 0" in record.error
    )
    assert [r.report.prompt for r in client.history(made.session_id)][1:] == ["a dog on a bench"]


def _serve_s3(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def test_a_chain_on_s3_rides_out_a_store_outage_without_losing_or_repeating_an_edit(
    ray_cluster, tiny_model_dir
):
    import boto3

    server = _serve_s3(0)
    port = server.get_host_and_port()[1]
    endpoint = f"http://127.0.0.1:{port}"
    bucket = boto3.client("s3", endpoint_url=endpoint)
    bucket.create_bucket(Bucket="outage")
    # Short S3 timeouts: requests on connections the stopped server leaves open fail fast.
    store = StoreConfig(
        url="s3://outage/x", endpoint_url=endpoint, max_attempts=2, read_timeout_s=2
    )
    config = _config(tiny_model_dir, store, 1)
    deploy.start(config)
    try:
        client = Client(config=config, timeout_s=TIMEOUT)
        job = client.submit_chain(_chain(CHAIN[:3], seed=17))
        client.wait(job, timeout=TIMEOUT, until=lambda r: bool(r.results))
        server.stop()
        server._server.server_close()  # refuse connections instead of leaving them hanging
        time.sleep(3)
        server = _serve_s3(port)  # moto keeps the bucket's objects in this process
        record = client.wait(job, timeout=TIMEOUT)
        history = client.history(record.session_id)
        listing = bucket.list_objects_v2(Bucket="outage", Prefix="x/tenants/local/")["Contents"]
    finally:
        deploy.stop(config)
        server.stop()

    assert record.state == "succeeded" and [r.version for r in record.results] == [1, 2, 3]
    assert [r.version for r in history] == [0, 1, 2, 3]
    keys = {item["Key"].removeprefix("x/tenants/local/") for item in listing}
    assert f"jobs/{job}.json" in keys
    assert {key for r in record.results for key in (r.image_key, r.recipe_key)} <= keys


def test_a_chain_survives_the_death_of_its_worker_with_identical_images(client, config):
    undisturbed = client.wait(client.submit_chain(_chain(seed=21)), timeout=TIMEOUT)
    assert undisturbed.state == "succeeded"

    job = client.submit_chain(_chain(seed=21))
    first = client.wait(job, timeout=TIMEOUT, until=lambda r: bool(r.results))
    holder = first.results[0].worker_id
    ray.kill(ray.get_actor(holder, namespace=config.namespace), no_restart=True)
    try:
        record = client.wait(job, timeout=TIMEOUT)
    finally:
        deploy.start(config)  # the dead worker comes back for whatever runs next

    assert record.state == "succeeded"
    assert [r.version for r in record.results] == [1, 2, 3, 4]
    assert any(r.cache_path == "rebuild" and r.worker_id != holder for r in record.results)
    for lost, kept in zip(record.results, undisturbed.results, strict=True):
        assert np.array_equal(_image(client, lost.image_key), _image(client, kept.image_key))


def test_a_drained_stop_stops_every_worker_and_names_the_sessions_it_could_not_snapshot(
    ray_cluster, tiny_model_dir, tmp_path
):
    # Two workers (on CPUs: the module's service holds two of the three edit slots), then a
    # stop with a config that names one, as `fisedit down` without --config would.
    config = _config(tiny_model_dir, StoreConfig(url=str(tmp_path)), 2).model_copy(
        update={"worker_resources": WorkerResources(num_cpus=0.5)}
    )
    deploy.start(config)
    try:
        client = Client(config=config, timeout_s=TIMEOUT)
        kept, blocked = (client.generate("a cat", steps=STEPS, seed=s) for s in (1, 2))
        # Something in the way of the blocked session's first shard: no snapshot of it.
        shard = f"tenants/local/sessions/{blocked.session_id}/v0/shard-00000.safetensors"
        (tmp_path / shard).mkdir(parents=True)
        assert deploy.running(config.namespace) == [ROUTER, JOB_QUEUE, "worker-0", "worker-1"]

        with pytest.raises(RuntimeError, match="not every session was snapshotted") as stopped:
            deploy.stop(config.model_copy(update={"workers": 1}), drain=True)
        wait_until(lambda: not deploy.running(config.namespace), "the actors' end", TIMEOUT)
    finally:
        deploy.stop(config)  # whatever a failure left running

    assert f"{blocked.worker_id}: " in str(stopped.value)
    assert f"but not {blocked.session_id}: " in str(stopped.value)
    store = config.store.open(f"tenants/{config.tenant}")
    assert store.exists(f"sessions/{kept.session_id}/v0/manifest.json")
    assert not store.exists(f"sessions/{blocked.session_id}/v0/manifest.json")


def test_starting_on_a_missing_bucket_fails_naming_it_before_any_actor_starts(
    ray_cluster, tiny_model_dir, s3_endpoint
):
    store = StoreConfig(url="s3://no-such-bucket/fisedit", endpoint_url=s3_endpoint)
    config = _config(tiny_model_dir, store, 1)
    with pytest.raises(StoreNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        deploy.start(config)
    assert deploy.running(config.namespace) == []


def test_starting_workers_that_no_node_can_hold_says_which_resources_are_missing(ray_cluster):
    wanting = WorkerResources(num_gpus=1, resources={"fast_disk": 1}).model_dump()
    with pytest.warns(UserWarning, match="no node of this cluster offers GPU, fast_disk \\(it has"):
        deploy.warn_if_unoffered(wanting, "the workers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        offered = WorkerResources(num_cpus=1, resources={"edit_slot": 1}).model_dump()
        deploy.warn_if_unoffered(offered, "the workers")


def test_room_for_counts_the_actors_that_resources_hold():
    each = WorkerResources(num_cpus=0.5, resources={"edit_slot": 1}).model_dump()
    assert deploy.room_for(each, {"CPU": 2.0, "edit_slot": 3.0}) == 3
    assert deploy.room_for(each, {"CPU": 1.0, "edit_slot": 3.0}) == 2
    assert deploy.room_for(each, {"CPU": 4.0}) == 0
    assert deploy.room_for(WorkerResources(num_cpus=0).model_dump(), {}) is None


def test_actors_without_room_now_are_told_why_they_wait():
    each = WorkerResources(num_cpus=1, resources={"edit_slot": 1}).model_dump()
    offered = {"CPU": 4.0, "edit_slot": 3.0}
    held = {"CPU": 4.0, "edit_slot": 1.0}
    assert deploy.room_warning(each, 2, "workers", offered, held) == (
        "room now for 1 of the 2 workers (1 CPU, 1 edit_slot each, 4 CPU, 1 edit_slot free): "
        "the rest wait until other actors, such as the service's workers, release what they hold"
    )
    too_many = deploy.room_warning(each, 4, "workers", offered, offered)
    assert too_many.endswith("the cluster holds at most 3 at once, so the rest wait for more nodes")
    assert deploy.room_warning(each, 3, "workers", offered, offered) is None
    # No node offers a GPU at all: warn_if_unoffered says that.
    assert deploy.room_warning({"num_gpus": 1}, 1, "workers", offered, offered) is None


def test_starting_more_actors_than_the_cluster_holds_at_once_says_so(ray_cluster):
    each = WorkerResources(num_cpus=0, resources={"edit_slot": 1}).model_dump()
    # The test cluster offers three edit slots.
    with pytest.warns(UserWarning, match="of the 4 workers .* holds at most 3 at once"):
        deploy.warn_if_no_room(each, 4, "workers")
