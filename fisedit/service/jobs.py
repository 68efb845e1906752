"""JobQueue: durable edit-chain jobs (generate, then edit a few words at a time).

A job record lives in the store (`jobs/<job>.json` under the tenant), rewritten at every
step, so a restarted queue resumes unfinished jobs from their last committed version. The
same idempotency key returns the existing job (`jobs/by-key/<key>`, written create-only).
Once a job's final record is stored, an empty marker `jobs/finished/<session>/<ms>-<job>`
says when it finished: a restarted queue lists the markers and reads only the records of
unfinished jobs and of the newest finished ones, however long the history.
Transient failures (a worker died, the store timed out) retry with backoff; permanent ones
(bad input, a stale version) fail the job with the reason. Cancel stops a job within a
denoise step or two: its running edit is abandoned (the session stays at its last committed
version) and no later edit starts. Workers report every denoise step; a record keeps only
the newest (in memory, saved with the next event), and `watch` answers as soon as a record
changes, so a stream sees steps.
A retried edit never writes a second result: each edit's version is known in advance, and a
version already committed is read back instead of made again. Memory holds the unfinished
jobs and the newest `kept_finished_jobs` finished ones, once their final record is stored;
the status of an older one is read from the store.
"""

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

import ray
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from fisedit.engine.config import GenerationParams, Prompt
from fisedit.service.config import ServiceConfig
from fisedit.service.names import ROUTER
from fisedit.service.results import (
    STORE_ID,
    EditRequest,
    EditResult,
    EditSpec,
    StaleVersionError,
    check_from_version,
    check_session_id,
    is_store_id,
)
from fisedit.service.router import NoWorkerError
from fisedit.storage import ObjectExistsError, ObjectNotFoundError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TRANSIENT = (
    RayActorError,
    NoWorkerError,
    TimeoutError,
    ConnectionError,
    BotoCoreError,
    ClientError,
    StorageError,
)
"""Failures worth retrying: the next try may find a live worker or a reachable store."""


def _transient(error: BaseException) -> bool:
    # A missing object or an invalid key is a store error too, but no retry will fix it.
    return isinstance(error, TRANSIENT) and not isinstance(error, KeyError | ValueError)


class QueueFullError(RuntimeError):
    """The queue holds its configured maximum of pending jobs."""


class UnknownJobError(KeyError):
    """No job with this id."""


class JobCancelledError(RuntimeError):
    """Raised at a denoise step of a job's edit (or generation) once the job is cancelled."""


def one_start(chain: BaseModel) -> BaseModel:
    """A chain's validator: it starts from a prompt (a new session) or a session, not both;
    only a session has older versions to start from."""
    if (chain.prompt is None) == (chain.session_id is None):
        raise ValueError("give prompt (a new session) or session_id (continue one)")
    if chain.from_version is not None and chain.session_id is None:
        raise ValueError("from_version: give it with session_id, whose version it names")
    return chain


class ChainSpec(GenerationParams):
    """An edit-chain job: generate from `prompt` (or continue `session_id`), then apply
    `edits` in order. Generation fields are those of GenerationParams."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: Prompt | None = None
    model: str | None = Field(None, description="Must be the service's model, if given.")
    edits: list[EditSpec] = Field(default_factory=list)
    session_id: str | None = Field(None, description="Continue this session instead.")
    from_version: int | None = Field(
        None,
        ge=0,
        description="With session_id: the version the first edit edits, when not the "
        "current one (a branch: the later versions stay).",
    )
    idempotency_key: str | None = None

    @field_validator("session_id")
    @classmethod
    def _valid_session(cls, session_id: str | None) -> str | None:
        return None if session_id is None else check_session_id(session_id)

    @field_validator("idempotency_key")
    @classmethod
    def _valid_key(cls, key: str | None) -> str | None:
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise ValueError("must be 1-128 letters, digits, '.', '-' or '_'")
        return key

    _one_start = model_validator(mode="after")(one_start)

    def generation(self) -> GenerationParams:
        return GenerationParams(**self.model_dump(include=set(GenerationParams.model_fields)))


class JobEvent(BaseModel):
    """One step of a job's progress."""

    at: float
    kind: Literal[
        "queued", "started", "generated", "edited", "retry", "succeeded", "failed", "cancelled"
    ]
    edit: int | None = None
    message: str = ""


class StepProgress(BaseModel):
    """The newest denoise step of the edit a job runs (`edit` None: its base generation)."""

    edit: int | None
    step: int
    steps: int


class JobRecord(BaseModel):
    """A job, its progress and its results, as stored."""

    job_id: str
    spec: ChainSpec
    state: JobState = "queued"
    session_id: str
    base_version: int
    """The session's version before the first edit (0 for a new session)."""
    generated: EditResult | None = None
    results: list[EditResult] = []
    """One per edit done, in order."""
    error: str | None = None
    cancel_requested: bool = False
    events: list[JobEvent] = []
    step: StepProgress | None = None
    """The newest step a worker reported (only the newest is kept)."""

    @property
    def progress(self) -> tuple[int, int]:
        return len(self.results), len(self.spec.edits)

    @property
    def running_edit(self) -> int | None:
        """The edit the job runs now, or next; None while it generates its base image."""
        if self.spec.session_id is None and self.generated is None:
            return None
        return len(self.results)


@dataclass
class StepReporter:
    """The per-step callback a worker calls for one edit of a job: it tells the queue
    without waiting for it, and stops the edit (JobCancelledError) once the queue's answer
    to an earlier report says the job was cancelled."""

    queue: ActorHandle
    job_id: str
    edit: int | None
    _answer: ObjectRef | None = None
    """The queue's answer to the previous report, read once it has arrived."""

    def __call__(self, step: int, steps: int) -> None:
        answer = self._answer
        if answer is not None and ray.wait([answer], timeout=0)[0] and ray.get(answer):
            raise JobCancelledError(f"job {self.job_id} was cancelled")
        self._answer = self.queue.step.remote(self.job_id, self.edit, step, steps)


CHECK_S = 30.0
"""How long a submission waits for a worker to check an edit (`_check_edits`); one that
takes longer (workers still starting) is left to the job, which checks it when it runs."""
FINISHED_MARKERS = "jobs/finished/"
_ID = STORE_ID.pattern.strip("^$")
MARKER = re.compile(rf"^{FINISHED_MARKERS}{_ID}/(\d+)-({_ID})$")


def _record_key(job_id: str) -> str:
    return f"jobs/{job_id}.json"


def _finished_key(record: JobRecord) -> str:
    """A finished job's marker: its name says the job's session and when it finished (its
    last event, in ms), so listing the markers is enough to know both."""
    finished_ms = round(record.events[-1].at * 1000)
    return f"{FINISHED_MARKERS}{record.session_id}/{finished_ms}-{record.job_id}"


def _marked(keys: list[str]) -> list[tuple[int, str, str]]:
    """(when it finished in ms, job id, marker) of each marker among `keys`, oldest first;
    other keys (none the queue wrote) are left out."""
    return sorted((int(m[1]), m[2], m[0]) for m in map(MARKER.match, keys) if m)


def _keys(record: JobRecord) -> list[str]:
    """The store keys of a job: its record, its idempotency key, its finished marker."""
    keys = [_record_key(record.job_id)]
    if record.spec.idempotency_key is not None:
        keys.append(f"jobs/by-key/{record.spec.idempotency_key}")
    if record.state in FINISHED:
        keys.append(_finished_key(record))
    return keys


def root_cause(error: BaseException) -> BaseException:
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


class JobQueue:
    """The Ray actor (named, see `service.deploy`) that runs edit-chain jobs through the router.

    After a (re)start it loads the stored jobs on its first call and resumes the unfinished
    ones; `deploy.start` makes that call.
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.store = config.store.open(f"tenants/{config.tenant}")
        self.jobs: dict[str, JobRecord] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots: asyncio.Semaphore | None = None
        self._resumed: asyncio.Task | None = None
        self._router_handle = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="job-records")
        self._revisions: Counter[str] = Counter()
        """Changes of each job (events and steps) since this queue started."""
        self._changes: dict[str, asyncio.Event] = {}
        """Set at a job's next change; `watch` calls wait on it."""
        self._finished: OrderedDict[str, None] = OrderedDict()
        """Finished jobs in memory whose final record is in the store, oldest first; older
        ones (beyond `kept_finished_jobs`) only the store holds."""

    async def submit(self, spec: ChainSpec) -> str:
        """Queues a job; returns its id (an existing job's, for a known idempotency key)."""
        await self._ready()
        spec = ChainSpec.model_validate(spec)
        by_key = spec.idempotency_key and f"jobs/by-key/{spec.idempotency_key}"
        if by_key and await asyncio.to_thread(self.store.exists, by_key):
            return (await asyncio.to_thread(self.store.get, by_key)).decode()  # even if full
        self._check(spec)
        job_id = uuid.uuid4().hex
        if spec.session_id is None:
            session_id, base_version = job_id, 0
        else:
            session_id, base_version = spec.session_id, await self._version(spec.session_id)
            check_from_version(session_id, base_version, spec.from_version)
        await self._check_edits(spec)
        record = JobRecord(
            job_id=job_id, spec=spec, session_id=session_id, base_version=base_version
        )
        record.events.append(JobEvent(at=time.time(), kind="queued"))
        # Known here before its key is stored: a concurrent retry that finds the key finds
        # the job. Durable before the caller learns the id: a restarted queue still has it.
        self.jobs[job_id] = record
        try:
            data = record.model_dump_json().encode()
            await asyncio.to_thread(self.store.put, _record_key(job_id), data)
            if by_key:
                await asyncio.to_thread(self.store.put, by_key, job_id.encode(), create_only=True)
        except BaseException as error:
            del self.jobs[job_id]
            await asyncio.to_thread(self._delete, [_record_key(job_id)])
            if isinstance(error, ObjectExistsError):  # a concurrent submission came first
                return (await asyncio.to_thread(self.store.get, by_key)).decode()
            raise
        self._start(record)
        return job_id

    async def status(self, job_id: str) -> JobRecord:
        await self._ready()
        return await self._find(job_id)

    async def cancel(self, job_id: str) -> JobRecord:
        """Stops the job: at once if it has not started, else at its running edit's next
        step report (the edit is abandoned; one that has finished is kept)."""
        await self._ready()
        record = await self._find(job_id)
        if record.state not in FINISHED:
            record.cancel_requested = True
            if record.state == "queued":
                self._finish(record, "cancelled")
        return record

    async def forget_session(self, session_id: str) -> list[str]:
        """Forgets every job on a session that is being deleted: an unfinished one stops
        where it is (an edit its worker runs still commits, and goes with the session), and
        each record leaves the store, its idempotency key too. Returns their ids."""
        await self._ready()
        forgotten = [r for r in self.jobs.values() if r.session_id == session_id]
        keys = []
        for record in forgotten:
            self._drop(record.job_id)  # streams watching it learn it is gone
            keys += _keys(record)
        in_memory = {r.job_id for r in forgotten}
        stored, stored_keys = await asyncio.to_thread(self._stored_of, session_id, in_memory)
        keys += stored_keys
        if keys:
            await asyncio.wrap_future(self._writer.submit(self._delete, keys))  # after saves
        return [r.job_id for r in forgotten] + stored

    async def watch(self, job_id: str, seen: int, timeout_s: float) -> tuple[int, JobRecord]:
        """The job's revision and record once its revision is past `seen` (at once if it
        is already), or after `timeout_s` without a change: a stream of the job's progress
        that waits instead of polling."""
        await self._ready()
        record = await self._find(job_id)
        if job_id in self.jobs and self._revisions[job_id] <= seen:
            change = self._changes.setdefault(job_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), timeout_s)
            record = await self._find(job_id)
        # A job only the store holds has finished: it changes no more.
        return self._revisions.get(job_id, seen + 1), record

    async def step(self, job_id: str, edit: int | None, step: int, steps: int) -> bool:
        """A worker ran `step` of `steps` of the job's `edit`; a report of an edit the job
        no longer runs (a late one, or from a try that failed) is dropped. Returns whether
        the job was cancelled: the worker then stops."""
        record = self.jobs.get(job_id)
        if record is None:
            return False
        if record.state == "running" and record.running_edit == edit:
            record.step = StepProgress(edit=edit, step=step, steps=steps)
            self._changed(record)
        return record.cancel_requested

    async def list_jobs(self, state: JobState | None = None) -> list[JobRecord]:
        """The unfinished jobs and the newest `kept_finished_jobs` finished ones."""
        await self._ready()
        return [r for r in self.jobs.values() if state is None or r.state == state]

    async def _version(self, session_id: str) -> int:
        try:
            return await self._router().version.remote(session_id)
        except Exception as error:
            cause = root_cause(error)
            if isinstance(cause, KeyError):
                raise ValueError(f"session_id: {cause.args[0]}") from None
            raise

    async def _check_edits(self, spec: ChainSpec) -> None:
        """Refuses a chain with an edit that would fail for its own faults (a mask or
        mask_steps that does not fit the session), naming the edit, before it is queued.
        Edits without either depend on nothing but their prompt, already checked."""
        params = None if spec.session_id is not None else spec.generation()
        for index, edit in enumerate(spec.edits):
            if edit.mask is None and edit.mask_key is None and edit.mask_steps is None:
                continue
            try:
                router = self._router()
            except ValueError:
                return  # no router yet: the job's edits are checked when they run
            call = router.check_edit.remote(spec.session_id, params, EditRequest(**dict(edit)))
            try:
                await asyncio.wait_for(call, CHECK_S)
            except Exception as error:
                cause = root_cause(error)
                if isinstance(cause, ValueError):
                    raise ValueError(f"edits.{index}.{cause}") from None
                # Not the edit's fault (no live worker yet, a timeout): the job meets it
                # again when it runs, retries it, and reports it.
                return

    def _check(self, spec: ChainSpec) -> None:
        if spec.model is not None and spec.model != self.config.model:
            raise ValueError(
                f"model: unknown model {spec.model!r}; this service runs {self.config.model!r}"
            )
        limit = self.config.queue.max_edits_per_job
        if len(spec.edits) > limit:
            raise ValueError(f"edits: {len(spec.edits)} edits, over the limit of {limit}")
        pending = sum(r.state not in FINISHED for r in self.jobs.values())
        if pending >= self.config.queue.max_pending_jobs:
            raise QueueFullError(f"the queue holds {pending} pending jobs, its maximum")

    async def _find(self, job_id: str) -> JobRecord:
        """The job's record: held here, else (a finished job beyond `kept_finished_jobs`)
        read from the store."""
        if job_id in self.jobs:
            return self.jobs[job_id]
        # Every unfinished job is in memory: a stored record is a finished one's.
        record = None
        if is_store_id(job_id):
            record = await asyncio.to_thread(self._read, _record_key(job_id))
        if record is None or record.state not in FINISHED:
            raise UnknownJobError(f"unknown job {job_id!r}")
        return record

    def _start(self, record: JobRecord) -> None:
        self.jobs[record.job_id] = record
        self._tasks[record.job_id] = asyncio.ensure_future(self._run(record))

    async def _run(self, record: JobRecord) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.queue.max_running_jobs)
        async with self._slots:
            if record.state in FINISHED:
                return
            record.state = "running"
            self._event(record, "started")
            try:
                await self._steps(record)
            except Exception as error:  # permanent, or transient past the retry budget
                cause = root_cause(error)
                if isinstance(cause, JobCancelledError):
                    edit = record.running_edit
                    what = "generation" if edit is None else f"edit {edit}"
                    self._finish(record, "cancelled", f"stopped during its {what}, not kept")
                    return
                record.error = f"{type(cause).__name__}: {cause}"
                self._finish(record, "failed", record.error)

    async def _steps(self, record: JobRecord) -> None:
        spec = record.spec
        if spec.session_id is None and record.generated is None:
            generate = partial(
                self._generate, spec.generation(), record.session_id, self._reporter(record)
            )
            record.generated = await self._retrying(record, None, generate)
            self._event(record, "generated", version=record.generated.version)
        for index in range(len(record.results), len(spec.edits)):
            if record.cancel_requested:
                self._finish(record, "cancelled")
                return
            # Each edit edits the version the one before gave (the one that edit edited,
            # when its prompt changed nothing), and extends the newest.
            previous = record.results[-1] if record.results else record.generated
            if previous is None:
                source = record.base_version if spec.from_version is None else spec.from_version
            else:
                source = previous.version
            newest = max([record.base_version, *(r.version for r in record.results)])
            request = EditRequest(
                **spec.edits[index].model_dump(),
                extends=newest,
                from_version=None if source == newest else source,
                request_id=f"{record.job_id}/{index}",
            )
            edit = partial(self._edit, record.session_id, request, self._reporter(record, index))
            result = await self._retrying(record, index, edit)
            record.results.append(result)
            self._event(record, "edited", index, version=result.version)
        self._finish(record, "succeeded")

    async def _generate(
        self, params: GenerationParams, session_id: str, reporter: StepReporter
    ) -> EditResult:
        return await self._router().generate.remote(params, session_id, reporter)

    async def _edit(
        self, session_id: str, request: EditRequest, reporter: StepReporter
    ) -> EditResult:
        """Applies the edit `request` to the session at version `request.extends`, unless a
        try before already did (the next version is then committed with its `request_id`).
        Another edit that came first makes this one stale (StaleVersionError)."""
        router = self._router()
        made = partial(self._made_by, router, session_id, request.extends + 1, request.request_id)
        committed = await made()
        if committed is not None:
            return committed
        try:
            return await router.edit.remote(session_id, request, reporter)
        except StaleVersionError:
            # A try before this one, which timed out here, may have committed it since.
            committed = await made()
            if committed is None:
                raise
            return committed

    @staticmethod
    async def _made_by(router, session_id: str, version: int, request_id: str) -> EditResult | None:
        """The session's committed `version` if the edit `request_id` made it, else None."""
        committed = await router.result.remote(session_id, version)
        return committed if committed is not None and committed.request_id == request_id else None

    def _reporter(self, record: JobRecord, edit: int | None = None) -> StepReporter:
        return StepReporter(ray.get_runtime_context().current_actor, record.job_id, edit)

    async def _retrying(
        self, record: JobRecord, edit: int | None, attempt: Callable[[], Awaitable[T]]
    ) -> T:
        policy, retries = self.config.retry, 0
        while True:
            try:
                return await asyncio.wait_for(attempt(), self.config.call_timeout_s)
            except Exception as error:
                cause = root_cause(error)
                retries += 1
                if not _transient(cause) or retries >= policy.attempts:
                    raise
                if record.cancel_requested:
                    raise JobCancelledError(f"job {record.job_id} was cancelled") from error
                if isinstance(cause, RayActorError):
                    self._router_handle = None  # the router may have restarted elsewhere
                self._event(record, "retry", edit, f"{type(cause).__name__}: {cause}")
            await asyncio.sleep(policy.delay(retries))

    def _router(self):
        if self._router_handle is None:
            self._router_handle = ray.get_actor(ROUTER, namespace=self.config.namespace)
        return self._router_handle

    def _event(
        self, record: JobRecord, kind: str, edit: int | None = None, message="", **extra
    ) -> Future[bool]:
        """Adds an event to the record; returns the future of its save."""
        if extra:
            message = " ".join([message, *(f"{k}={v}" for k, v in extra.items())]).strip()
        record.events.append(JobEvent(at=time.time(), kind=kind, edit=edit, message=message))
        saved = self._save(record)
        self._changed(record)
        return saved

    def _changed(self, record: JobRecord) -> None:
        self._revisions[record.job_id] += 1
        change = self._changes.pop(record.job_id, None)
        if change is not None:
            change.set()

    def _finish(self, record: JobRecord, state: JobState, message: str = "") -> None:
        record.state = state
        self._store_final(record, self._event(record, state, message=message))

    def _store_final(self, record: JobRecord, saved: Future[bool], retry_s: float = 1.0) -> None:
        """Marks a finished job once its final record (`saved`) is stored; until then memory
        holds it. A store that is down is tried again later, more and more rarely: no later
        change of a finished job would save it, and a restart would run it again."""
        loop = asyncio.get_running_loop()

        def stored(marked: Future[bool]) -> None:
            if marked.result():
                loop.call_soon_threadsafe(self._kept, record.job_id)
            else:
                loop.call_soon_threadsafe(
                    loop.call_later, retry_s, self._store_again, record, retry_s
                )

        self._writer.submit(self._mark_finished, record, saved).add_done_callback(stored)

    def _store_again(self, record: JobRecord, retry_s: float) -> None:
        if self.jobs.get(record.job_id) is record:  # not forgotten with its session since
            self._store_final(record, self._save(record), min(2 * retry_s, 60.0))

    def _kept(self, job_id: str) -> None:
        """Counts a finished job whose final record is stored; beyond `kept_finished_jobs`
        the oldest ones leave memory (`status` reads them from the store)."""
        if job_id not in self.jobs:
            return  # forgotten with its session meanwhile
        self._finished[job_id] = None
        while len(self._finished) > self.config.queue.kept_finished_jobs:
            self._drop(next(iter(self._finished)))  # streams waiting read it from the store

    def _drop(self, job_id: str) -> None:
        """Takes a job out of memory, stopping its task if it still runs; streams waiting
        on it wake up."""
        record = self.jobs.pop(job_id)
        self._finished.pop(job_id, None)
        task = self._tasks.pop(job_id, None)
        if task is not None:
            task.cancel()
        self._changed(record)
        self._revisions.pop(job_id)

    def _save(self, record: JobRecord) -> Future[bool]:
        """Writes the record in the background, in order, off the event loop; the future
        says whether it was saved."""
        key, data = _record_key(record.job_id), record.model_dump_json().encode()
        return self._writer.submit(self._write, key, data)

    def _mark_finished(self, record: JobRecord, saved: Future[bool]) -> bool:
        """Writes a finished job's marker, if its final record was saved (by the writer
        thread, just before); says whether both are stored."""
        return saved.result() and self._write_marker(record)

    def _write_marker(self, record: JobRecord) -> bool:
        return self._write(_finished_key(record), b"")

    def _delete(self, keys: list[str]) -> None:
        try:
            for key in keys:
                self.store.delete(key)
        except TRANSIENT as error:
            log.warning("%s not deleted: %s", keys, error)

    def _write(self, key: str, data: bytes) -> bool:
        # Best effort: while the store is down the record lives on here and is saved with
        # its next change; edits themselves are committed by the workers.
        try:
            self.store.put(key, data)
        except TRANSIENT as error:
            log.warning("%s not saved: %s", key, error)
            return False
        return True

    async def _ready(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.ensure_future(self._resume())
        resumed = self._resumed
        try:
            await asyncio.shield(resumed)
        except Exception:
            if self._resumed is resumed:
                self._resumed = None  # the store failed: the next call tries again
            raise

    async def _resume(self) -> None:
        """Loads the stored jobs: unfinished ones run again from their last result, and the
        newest `kept_finished_jobs` finished ones stay in memory."""
        unfinished, finished = await asyncio.to_thread(self._stored_jobs)
        for record in finished:
            self.jobs[record.job_id] = record
            self._kept(record.job_id)
        for record in unfinished:
            record.state = "queued"
            self._start(record)

    def _stored_jobs(self) -> tuple[list[JobRecord], list[JobRecord]]:
        """The unfinished jobs, and the newest `kept_finished_jobs` finished ones, oldest
        first. Records of finished jobs beyond those are not read; one finished before
        markers were written gets its marker now."""
        keys = self.store.list("jobs/")
        marked = dict.fromkeys(job_id for _, job_id, _ in _marked(keys))  # oldest first
        records = {
            key.removeprefix("jobs/").removesuffix(".json"): key
            for key in keys
            if key.count("/") == 1 and key.endswith(".json")
        }
        unmarked = [key for job_id, key in records.items() if job_id not in marked]
        newest = list(marked)[max(0, len(marked) - self.config.queue.kept_finished_jobs) :]
        read = [self._read(key) for key in unmarked + [_record_key(j) for j in newest]]
        unfinished, finished = [], []
        for record in filter(None, read):
            if record.state not in FINISHED:
                unfinished.append(record)
                continue
            if record.job_id not in marked:
                self._write_marker(record)
            finished.append(record)
        finished.sort(key=lambda r: r.events[-1].at)
        return unfinished, finished

    def _stored_of(self, session_id: str, skip: set[str]) -> tuple[list[str], list[str]]:
        """The session's finished jobs that only the store holds (not those in `skip`), and
        their keys."""
        prefix, job_ids, keys = f"{FINISHED_MARKERS}{session_id}/", [], []
        for _, job_id, marker in _marked(self.store.list(prefix)):
            if job_id in skip:
                continue
            record = self._read(_record_key(job_id))
            job_ids.append(job_id)
            keys += [marker] if record is None else _keys(record)
        return job_ids, keys

    def _read(self, key: str) -> JobRecord | None:
        """The job record under `key`; None if there is none, or (with a warning) if it
        cannot be read."""
        try:
            return JobRecord.model_validate_json(self.store.get(key))
        except ObjectNotFoundError:
            return None
        except ValueError as error:
            log.warning("skipping unreadable job record %s: %s", key, error)
            return None
