"""The job queue's records: the newest finished jobs in memory, older ones only in the store.

These drive the JobQueue class directly over a local store, with finished jobs only (so
nothing runs and no Ray is needed); test_service.py runs it as an actor with real jobs."""

import asyncio

import pytest

from fisedit.service.config import QueueLimits, ServiceConfig, StoreConfig
from fisedit.service.jobs import (
    ChainSpec,
    JobCancelledError,
    JobEvent,
    JobQueue,
    JobRecord,
    QueueFullError,
    UnknownJobError,
)


def _finished(number: int, session_id: str, key: str | None = None) -> JobRecord:
    spec = ChainSpec(prompt="a cat", edits=[{"prompt": "a dog"}], idempotency_key=key)
    events = [JobEvent(at=1000.0 + number, kind="succeeded")]
    job_id = f"job{number}"
    return JobRecord(
        job_id=job_id, spec=spec, state="succeeded", session_id=session_id, base_version=0,
        events=events,
    )  # fmt: skip


RECORDS = [_finished(0, "s1", key="retry-0"), _finished(1, "s1"), _finished(2, "s2"),
           _finished(3, "s2")]  # fmt: skip
"""Four finished jobs, finished in this order, the oldest two on session s1."""


def _queue(tmp_path, kept: int, **limits) -> JobQueue:
    """A queue over a store that holds RECORDS, keeping `kept` finished jobs in memory."""
    limits = QueueLimits(kept_finished_jobs=kept, **limits)
    config = ServiceConfig(store=StoreConfig(url=str(tmp_path)), queue=limits)
    store = config.store.open(f"tenants/{config.tenant}")
    for record in reversed(RECORDS):  # stored out of order: the queue orders them
        store.put(f"jobs/{record.job_id}.json", record.model_dump_json().encode())
    store.put("jobs/by-key/retry-0", b"job0")
    return JobQueue(config)


def test_a_restarted_queue_holds_the_newest_finished_jobs_and_reads_older_ones(tmp_path):
    queue = _queue(tmp_path, kept=2)

    async def scenario():
        listed = await queue.list_jobs()
        statuses = [await queue.status(r.job_id) for r in RECORDS]
        _, watched = await queue.watch("job0", seen=7, timeout_s=600)  # finished: at once
        cancelled = await queue.cancel("job0")
        return listed, statuses, watched, cancelled

    listed, statuses, watched, cancelled = asyncio.run(scenario())

    assert [r.job_id for r in listed] == ["job2", "job3"] and set(queue.jobs) == {"job2", "job3"}
    assert statuses == RECORDS
    assert watched == cancelled == RECORDS[0] and cancelled.state == "succeeded"


def test_forgetting_a_session_deletes_its_jobs_in_memory_and_those_only_stored(tmp_path):
    queue = _queue(tmp_path, kept=3)  # job0 only in the store, job1 in memory too

    async def scenario():
        forgotten = await queue.forget_session("s1")
        with pytest.raises(UnknownJobError):
            await queue.status("job0")
        return forgotten, await queue.list_jobs()

    forgotten, listed = asyncio.run(scenario())

    assert sorted(forgotten) == ["job0", "job1"]
    assert [r.job_id for r in listed] == ["job2", "job3"]
    # What is left: s2's records, and the markers the restart wrote for them.
    assert queue.store.list("jobs/") == [
        "jobs/finished/s2/1002000-job2",
        "jobs/finished/s2/1003000-job3",
        "jobs/job2.json",
        "jobs/job3.json",
    ]


class ReadLog:
    """A store that notes every key read from it (the real store underneath)."""

    def __init__(self, store) -> None:
        self.store, self.read = store, []

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def get(self, key: str) -> bytes:
        self.read.append(key)
        return self.store.get(key)


def test_a_restarted_queue_reads_only_the_records_it_holds_in_memory(tmp_path):
    asyncio.run(_queue(tmp_path, kept=2).list_jobs())  # marks the finished jobs it finds
    queue = _queue(tmp_path, kept=1)
    queue.store.put("jobs/finished/s1/notes.txt", b"not a marker")  # left alone
    queue.store = log = ReadLog(queue.store)

    async def scenario():
        listed = await queue.list_jobs()
        started_with = list(log.read)
        return listed, started_with, await queue.status("job0")

    listed, started_with, old = asyncio.run(scenario())

    assert [r.job_id for r in listed] == ["job3"] and started_with == ["jobs/job3.json"]
    assert old == RECORDS[0] and log.read[-1] == "jobs/job0.json"


def _queue_with_a_stopped_job(tmp_path) -> JobQueue:
    """A queue over RECORDS and job9, a job on s3 whose cancel was asked for before the
    queue stopped: it ends at the restart, before its next edit (so nothing runs)."""
    spec = ChainSpec(session_id="s3", edits=[{"prompt": "a dog"}])
    stopped = JobRecord(
        job_id="job9", spec=spec, state="running", session_id="s3", base_version=1,
        cancel_requested=True,
    )  # fmt: skip
    queue = _queue(tmp_path, kept=4)
    queue.store.put("jobs/job9.json", stopped.model_dump_json().encode())
    return queue


async def _restarted_until_job9_is_marked(queue: JobQueue) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    await queue.list_jobs()
    while not queue.store.list("jobs/finished/s3/"):
        assert asyncio.get_running_loop().time() < deadline, "job9 never marked finished"
        await asyncio.sleep(0.05)


def test_a_finished_job_is_marked_so_and_a_restart_reads_only_the_newest(tmp_path):
    queue = _queue_with_a_stopped_job(tmp_path)

    async def scenario():
        await _restarted_until_job9_is_marked(queue)
        return await queue.status("job9")

    cancelled = asyncio.run(scenario())
    (marker,) = queue.store.list("jobs/finished/s3/")
    assert cancelled.state == "cancelled"
    assert marker == f"jobs/finished/s3/{round(cancelled.events[-1].at * 1000)}-job9"

    restarted = _queue(tmp_path, kept=1)
    restarted.store = log = ReadLog(restarted.store)
    assert asyncio.run(restarted.list_jobs()) == [cancelled] and log.read == ["jobs/job9.json"]


class Failing:
    """A store whose first `times` calls of `method` (on `key`, if given) fail, as a store
    that is briefly unreachable does."""

    def __init__(self, store, method: str, times: int = 1, key: str | None = None) -> None:
        self.store, self.method, self.times, self.key = store, method, times, key

    def __getattr__(self, name: str):
        real = getattr(self.store, name)
        if name != self.method:
            return real

        def call(*args, **kwargs):
            if self.times and self.key in (None, args[0]):
                self.times -= 1
                raise ConnectionError("the store timed out")
            return real(*args, **kwargs)

        return call


def test_a_queue_whose_store_failed_at_its_first_call_loads_its_jobs_at_the_next(tmp_path):
    queue = _queue(tmp_path, kept=2)
    queue.store = Failing(queue.store, "list")

    with pytest.raises(ConnectionError, match="timed out"):
        asyncio.run(queue.list_jobs())
    listed = asyncio.run(queue.list_jobs())

    assert [r.job_id for r in listed] == ["job2", "job3"]


def test_a_job_cancelled_while_it_waits_to_retry_stops_retrying(tmp_path):
    queue = _queue(tmp_path, kept=1)
    spec = ChainSpec(session_id="s1", edits=[{"prompt": "a dog"}])
    record = JobRecord(job_id="job8", spec=spec, state="running", session_id="s1", base_version=0)
    tries = []

    async def attempt():
        tries.append(len(tries))
        record.cancel_requested = True  # asked for while this try ran
        raise ConnectionError("the store timed out")  # transient: would be retried

    with pytest.raises(JobCancelledError, match="job8 was cancelled"):
        asyncio.run(queue._retrying(record, 0, attempt))
    assert tries == [0]


def test_a_final_record_the_store_could_not_take_is_stored_once_it_can(tmp_path):
    queue = _queue_with_a_stopped_job(tmp_path)
    # Down for the job's two writes at the restart: it starts, then ends cancelled.
    queue.store = Failing(queue.store, "put", times=2, key="jobs/job9.json")

    asyncio.run(_restarted_until_job9_is_marked(queue))
    stored = JobRecord.model_validate_json(queue.store.get("jobs/job9.json"))
    assert (stored.state, queue.store.times) == ("cancelled", 0)


def test_a_full_queue_still_answers_a_retry_with_its_job_and_refuses_a_new_job(tmp_path):
    queue = _queue(tmp_path, kept=4, max_pending_jobs=1)
    spec = ChainSpec(session_id="s1", edits=[{"prompt": "a dog"}])

    async def scenario():
        await queue.list_jobs()  # loaded: job0 to job3, all finished
        queue.jobs["job8"] = JobRecord(job_id="job8", spec=spec, session_id="s1", base_version=0)
        retried = await queue.submit(spec.model_copy(update={"idempotency_key": "retry-0"}))
        with pytest.raises(QueueFullError, match="1 pending jobs, its maximum"):
            await queue.submit(spec)
        return retried

    assert asyncio.run(scenario()) == "job0"
    assert sorted(queue.jobs) == ["job0", "job1", "job2", "job3", "job8"]
