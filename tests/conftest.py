"""Shared fixtures: tiny diffusers models, and a real S3 endpoint (moto's server over HTTP)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Ray starts its workers at niceness 15: on a machine busy with other jobs they get a few
# percent of a core and the service tests crawl past their timeouts (workers did 27 s of CPU
# in 12.5 minutes beside two busy processes). The tests' own clusters run them at normal
# priority; every cluster and subprocess the tests start inherits this.
os.environ.setdefault("RAY_worker_niceness", "0")
# Triton decides between compiling and interpreting when it is imported: without a GPU its
# kernels run under the CPU interpreter. (Checked without importing torch, which is slow.)
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fisedit.engine.kernels.launch import interpreting  # noqa: E402
from fisedit.engine.models import build_tiny_model  # noqa: E402


def _skip_discarded_overflow_checks() -> None:
    """Triton's interpreter redoes every int32 add, sub and mul of a kernel in int64 to check
    it for overflow, then drops the check (its asserts only fire with debug on): about a
    third of an interpreted kernel's time, for nothing."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


if interpreting():
    _skip_discarded_overflow_checks()

# boto3, moto and the storage package are imported inside the S3 fixtures, so the engine's
# tests also run where only the GPU stack is installed.


@pytest.fixture(autouse=True)
def seeded_torch() -> None:
    """Every test draws the same random numbers (layer initialisations included) whichever
    tests ran before it, so a result never depends on the selection or order of tests."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def python_without() -> Callable[..., subprocess.CompletedProcess]:
    """Runs a Python script in a new interpreter in which importing any of the named
    packages fails, as on a machine without them (the GPU machine has neither Ray nor
    boto3); returns the finished process, its output captured as text."""

    def run(
        packages: list[str], script: str, *args: str, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        blocker = f"import sys\nsys.modules.update(dict.fromkeys({packages!r}))\n"
        command = [sys.executable, "-c", blocker + script, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    return run


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Gives a TCP port free on 127.0.0.1 for a server a test starts, a new one each call.

    Not one the kernel picks for a bind to port 0: while a Ray node starts, its processes
    bind and connect in numbers, and any of them may take such an ephemeral port before the
    server binds it (a head's dashboard once failed so). The ports come from between Ray's
    worker ports (10002-19999) and the ephemeral range, where only explicit binds land."""
    ephemeral = _ephemeral_ports()
    pool = [port for port in range(20000, 32768) if port not in ephemeral]
    random.Random(os.getpid()).shuffle(pool)
    candidates = iter(pool)

    def pick() -> int:
        for port in candidates:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free port left between 20000 and the ephemeral range")

    return pick


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny SD 1.5, SD 2 (v-prediction) and SDXL pipelines written with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    return {v: str(build_tiny_model(root / v, v)) for v in ("sd15", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["sd15"]


@pytest.fixture(scope="session")
def static_step_engine() -> type:
    """An Engine class that takes the graph path on any device: UNet calls run over static
    buffers and slots, and are captured as CUDA graphs only on a GPU, so CPU tests check
    everything but the capture."""
    from fisedit.engine import Engine

    class StaticStepEngine(Engine):
        @property
        def graphs(self) -> bool:
            return True

    return StaticStepEngine


BUCKET = "fisedit-test"
MiB = 1 << 20


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on a free 127.0.0.1 port, holding the bucket BUCKET.

    Dummy credentials go through the environment, so stores use boto3's standard chain; the
    developer's own AWS config and credentials files are hidden.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
            yield url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str):
    """A plain boto3 client, to look at the bucket behind a store's back."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def make_s3_store(s3_endpoint: str) -> Callable:
    """Builds S3 stores in BUCKET with S3's smallest parts (5 MiB), so multipart stays cheap."""
    from fisedit.storage import S3Config, S3ObjectStore

    def make(prefix: str) -> S3ObjectStore:
        config = S3Config(
            bucket=BUCKET,
            prefix=prefix,
            endpoint_url=s3_endpoint,
            multipart_threshold=5 * MiB,
            part_size=5 * MiB,
        )
        return S3ObjectStore(config)

    return make


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty store of each backend: tests using it prove both behave the same."""
    from fisedit.storage import LocalConfig, LocalObjectStore

    if request.param == "local":
        return LocalObjectStore(LocalConfig(root=tmp_path / "store"))
    # A fresh prefix per test keeps tests apart in the shared bucket.
    return request.getfixturevalue("make_s3_store")(f"tests/{uuid.uuid4().hex}")
