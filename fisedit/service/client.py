"""The Python client: edit-chain jobs and interactive edits, from a Ray driver or Ray Client.

client = Client("auto")                       # a driver on the cluster (or a GCS address)
client = Client("ray://head:10001")           # Ray Client, from another machine
job = client.submit_chain({"prompt": "a cat", "edits": [{"prompt": "a dog"}]})
record = client.wait(job, timeout=600)
"""

import time
from collections.abc import Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from fisedit.engine.config import GenerationParams
from fisedit.service.config import ServiceConfig
from fisedit.service.jobs import FINISHED, ChainSpec, JobRecord, JobState, root_cause
from fisedit.service.names import JOB_QUEUE, ROUTER
from fisedit.service.results import EditRequest, EditResult, StaleVersionError


class Client:
    """Talks to a running service's router and job queue (found by name in its namespace).

    `address`: "auto" or a GCS address joins a running cluster, "ray://host:port" goes
    through Ray Client, None starts a local Ray. An already connected driver is reused.
    Errors raised in the service (StaleVersionError, bad input) arrive as those types.
    """

    def __init__(
        self,
        address: str | None = "auto",
        config: ServiceConfig | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.config = config or ServiceConfig()
        self.timeout_s = timeout_s or self.config.call_timeout_s
        if not ray.is_initialized():
            self._connect(address)
        self._actors: dict[str, ray.actor.ActorHandle] = {}

    def _connect(self, address: str | None) -> None:
        """Joins the cluster, retrying (per the config's policy) when a Ray Client server
        fails to start the session's server, which it may do under load."""
        policy = self.config.retry
        for retry in range(policy.attempts):
            if retry:
                time.sleep(policy.delay(retry))
            try:
                ray.init(address=address, namespace=self.config.namespace)
                return
            except ConnectionAbortedError:
                if retry == policy.attempts - 1:
                    raise

    def _call(self, actor: str, method: str, *args):
        """Calls a service actor, retrying while it restarts: for up to `timeout_s` while
        Ray says it is restarting (Ray ends that state, with the actor back or dead), and
        per the config's policy when it is gone. An error the actor raised is raised here."""
        policy = self.config.retry
        deadline = time.monotonic() + self.timeout_s
        retry = gone = 0
        while True:
            try:
                if actor not in self._actors:
                    self._actors[actor] = ray.get_actor(actor, namespace=self.config.namespace)
                ref = getattr(self._actors[actor], method).remote(*args)
                return ray.get(ref, timeout=self.timeout_s)
            except ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise
            except RayActorError:
                self._actors.pop(actor, None)  # it may come back as a new actor
                gone += 1
                if gone == policy.attempts:
                    raise
            except RayTaskError as error:
                # The actor's own error (a ValueError naming the field, say), with Ray's
                # remote traceback kept as its cause rather than in its message. After the
                # two above: an actor the called one calls that restarts is retried too.
                raise root_cause(error) from error
            retry += 1
            time.sleep(policy.delay(retry))

    # Jobs

    def submit_chain(self, spec: ChainSpec | dict) -> str:
        """Queues an edit chain (validated here first); returns the job id. An edit whose
        mask or mask_steps does not fit the session is refused before anything is queued,
        with a ValueError naming it (`edits.1.mask: ...`)."""
        return self._call(JOB_QUEUE, "submit", ChainSpec.model_validate(spec))

    def status(self, job_id: str) -> JobRecord:
        return self._call(JOB_QUEUE, "status", job_id)

    def wait(
        self,
        job_id: str,
        timeout: float,
        poll_s: float = 0.1,
        on_progress: Callable[[JobRecord], None] | None = None,
        until: Callable[[JobRecord], bool] | None = None,
    ) -> JobRecord:
        """Polls until the job finishes (or `until` holds); TimeoutError after `timeout`
        seconds. `on_progress` sees every record whose progress or state changed."""
        deadline, seen = time.monotonic() + timeout, None
        while True:
            record = self.status(job_id)
            if on_progress is not None and (record.state, record.progress) != seen:
                seen = (record.state, record.progress)
                on_progress(record)
            if record.state in FINISHED or (until is not None and until(record)):
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {record.state} after {timeout} s "
                    f"({record.progress[0]}/{record.progress[1]} edits)"
                )
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> JobRecord:
        """Stops the job: its running edit at the next denoise step (the session stays at
        its last committed version), and every edit after it."""
        return self._call(JOB_QUEUE, "cancel", job_id)

    def results(self, job_id: str) -> list[EditResult]:
        """The job's results so far: one per edit done, in order."""
        return self.status(job_id).results

    def list_jobs(self, state: JobState | None = None) -> list[JobRecord]:
        """Unfinished jobs, and the newest `queue.kept_finished_jobs` finished ones (`status`
        reads any job)."""
        return self._call(JOB_QUEUE, "list_jobs", state)

    # Interactive sessions

    def generate(self, prompt: str, session_id: str | None = None, **params) -> EditResult:
        params = GenerationParams(prompt=prompt, **params)
        return self._call(ROUTER, "generate", params, session_id)

    def edit(self, session_id: str, prompt: str, extends: int | None = None, **options):
        """Edits a session; `extends` (its current version) guards against stale state;
        options: mask (PNG bytes), mask_key, mask_steps, and from_version, an older version
        to edit instead of the current one (a branch, numbered after the newest)."""
        request = EditRequest(prompt=prompt, extends=extends, **options)
        try:
            return self._call(ROUTER, "edit", session_id, request)
        except StaleVersionError:
            # Retried after the router restarted mid-call, the edit may have committed at
            # the first try: the same edit of the same version is then that result.
            if extends is None:
                raise
            committed = self._call(ROUTER, "result", session_id, extends + 1)
            if committed is None or committed.report.prompt != prompt:
                raise
            return committed

    def snapshot(self, session_id: str) -> str:
        """Snapshots the session's current version (a later failover then restores it
        instead of recomputing); returns the manifest key."""
        return self._call(ROUTER, "snapshot", session_id)

    def history(self, session_id: str) -> list[EditResult]:
        return self._call(ROUTER, "history", session_id)

    def read(self, key: str) -> bytes:
        """An image, mask or report named by a result's key."""
        return self._call(ROUTER, "read", key)
