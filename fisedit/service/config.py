"""One configuration for the service: the CLI, the Serve app and Ray Jobs all read it."""

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fisedit.engine.config import EngineConfig, TierConfig
from fisedit.storage import ObjectStore, open_store, validate_key


class StoreConfig(BaseModel):
    """Where results, recipes, snapshots and job records live.

    A plain path or file:/// URL is a local directory (the embedded default); s3://bucket/prefix
    an S3-compatible bucket. S3 credentials come from boto3's standard chain (the AWS_*
    environment variables, a profile, an instance role), never from this file.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field("fisedit-store", description="Directory, file:/// URL or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph); None for AWS.")
    region: str | None = None
    max_attempts: int | None = Field(None, ge=1, description="S3 tries per request.")
    read_timeout_s: float | None = Field(None, gt=0, description="S3 read timeout.")

    def open(self, prefix: str = "") -> ObjectStore:
        """The store, or the part of it under `prefix` (keys then start below it).
        S3 options left at None keep the S3 backend's defaults."""
        url = f"{self.url.rstrip('/')}/{validate_key(prefix)}" if prefix else self.url
        if not url.startswith("s3://"):
            return open_store(url)
        options = self.model_dump(exclude={"url"}, exclude_none=True)
        return open_store(url, **options)


class WorkerResources(BaseModel):
    """What each EditWorker actor reserves: `num_gpus: 1` on GPU clusters, a custom resource
    (e.g. `{"edit_slot": 1}`) on CPU-only ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)


class QueueLimits(BaseModel):
    """Bounds on the job queue, so a flood of submissions cannot exhaust it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_pending_jobs: int = Field(1000, ge=1, description="Queued plus running jobs.")
    max_running_jobs: int = Field(8, ge=1, description="Jobs whose edits run concurrently.")
    max_edits_per_job: int = Field(100, ge=1)
    kept_finished_jobs: int = Field(
        1000,
        ge=1,
        description="Finished jobs whose records the queue keeps in memory (the newest), for "
        "listing, and reads at a restart; older ones only the store holds, where a job's "
        "status is still read.",
    )
    migrate_above: int | None = Field(
        None,
        ge=0,
        description="Bounded load: an edit moves its session off a holder with more calls in "
        "flight than this, to a less-loaded worker, if the session's current version has a "
        "snapshot (so the move costs one restore). None: sessions never move while alive.",
    )


class RetryPolicy(BaseModel):
    """How transient failures (a worker died, the store timed out) are retried."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(5, ge=1, description="Tries per step, the first one included.")
    backoff_s: float = Field(0.5, ge=0, description="Wait before the first retry.")
    backoff_factor: float = Field(2.0, ge=1)
    max_backoff_s: float = Field(10.0, ge=0)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        return min(self.backoff_s * self.backoff_factor ** (retry - 1), self.max_backoff_s)


LOCALHOST = frozenset({"127.0.0.1", "localhost", "::1"})


class HttpConfig(BaseModel):
    """The HTTP API (a Ray Serve FastAPI ingress): where it listens, who may call it, and the
    bounds that turn overload into 429/503 instead of a pile-up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    replicas: int = Field(1, ge=1, description="Ingress replicas (they hold no session state).")
    anonymous: bool = Field(
        False,
        description="Serve every request as the config's tenant, without API keys. Only for "
        "`fisedit serve` on localhost.",
    )
    api_keys_file: str | None = Field(
        None,
        description='JSON {"tenant": "<sha256 hex of its key>" or [hashes]}; the environment '
        "variable FISEDIT_API_KEYS (the same JSON) is read when this is unset.",
    )
    max_in_flight: int = Field(32, ge=1, description="Requests in flight per replica: 503.")
    max_in_flight_per_tenant: int = Field(8, ge=1, description="Per tenant and replica: 429.")
    max_streams: int = Field(32, ge=1, description="Open event streams per replica: 503.")
    max_streams_per_tenant: int = Field(4, ge=1, description="Per tenant and replica: 429.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After of a 429 or 503.")
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_mask_bytes: int = Field(2 << 20, ge=64, description="A decoded mask PNG.")
    max_prompt_chars: int = Field(1000, ge=1)
    max_steps: int = Field(200, ge=2, description="Denoise steps of a generation.")
    max_image_side: int = Field(2048, ge=8, description="Height or width of an image, pixels.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest wait on one call: 504.")

    @model_validator(mode="after")
    def _anonymous_only_on_localhost(self) -> "HttpConfig":
        if self.anonymous and self.host not in LOCALHOST:
            raise ValueError(f"anonymous mode listens on localhost only, not {self.host!r}")
        return self


class ServiceConfig(BaseModel):
    """The whole service: model, engine, cache budgets, store, workers, queue and retries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        "tiny",
        description="diffusers directory or hub id; tiny, tiny-sd2, tiny-sdxl build a small "
        "random model on each worker (deterministic, so every worker has the same weights).",
    )
    engine: EngineConfig = EngineConfig(progress=False)
    tiers: TierConfig = TierConfig()
    store: StoreConfig = StoreConfig()
    tenant: str = Field("local", description="Key prefix tenants/<tenant>/ of everything stored.")
    namespace: str = Field("fisedit", min_length=1, description="Ray namespace of the actors.")
    workers: int = Field(2, ge=1, description="EditWorker actors, one per GPU.")
    worker_resources: WorkerResources = WorkerResources()
    queue: QueueLimits = QueueLimits()
    retry: RetryPolicy = RetryPolicy()
    affinity: bool = Field(
        True,
        description="Send follow-up edits to the worker holding the session's cache; off "
        "(the service benchmark's baseline) sends each edit to a random worker, which "
        "restores the session from the snapshot its holder writes first.",
    )
    call_timeout_s: float = Field(600.0, gt=0, description="Longest one actor call may take.")
    http: HttpConfig = HttpConfig()

    @model_validator(mode="after")
    def _tenant_is_one_key_segment(self) -> "ServiceConfig":
        if "/" in self.tenant:
            raise ValueError(f"tenant {self.tenant!r} must not contain '/'")
        validate_key(self.tenant)
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServiceConfig":
        """Reads a YAML file; missing fields keep their defaults. A file that is not YAML
        is a ValueError naming it."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: expected a mapping of config fields, got {type(data).__name__}"
            )
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
