"""The service from outside the cluster: a real head node (`ray start --head`), a chain run
through Ray Client (`ray://`), and the Ray Jobs entrypoint run through JobSubmissionClient."""

import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from polling import wait_until

from fisedit.service.config import ServiceConfig
from fisedit.service.jobs import ChainSpec

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
TIMEOUT = 600


def _wait_for_ports(node: subprocess.Popen, ports: list[int]) -> None:
    def listening(port: int) -> bool:
        assert node.poll() is None, f"ray start exited with {node.returncode}"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    for port in ports:
        wait_until(partial(listening, port), f"listener on port {port}", TIMEOUT, interval=0.5)


@pytest.fixture(scope="module")
def head(tmp_path_factory, tiny_model_dir, process_group, free_port):
    """A head node with the Ray Client server and the dashboard (for Ray Jobs), two edit
    slots, and a service config (tiny model, local store) written as YAML."""
    root = tmp_path_factory.mktemp("head")
    ports = {"gcs": free_port(), "client": free_port(), "dashboard": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Ray's socket paths are limited in length: a short temp dir under /tmp.
    temp_dir = Path(f"/tmp/fisedit-ray-{ports['gcs']}")
    start = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-port={ports['dashboard']}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        '--resources={"edit_slot": 2}',
        "--object-store-memory=150000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--block",
    ]
    config = ServiceConfig.model_validate(
        {
            "model": tiny_model_dir,
            "engine": {"progress": False, "edit": {"mask_steps": 1}},
            "store": {"url": str(root / "store")},
            "namespace": "fisedit-entrypoints",
            "workers": 2,
            "worker_resources": {"num_cpus": 0, "resources": {"edit_slot": 1}},
            "call_timeout_s": TIMEOUT,
        }
    )
    config_path = root / "service.yaml"
    config_path.write_text(config.to_yaml())
    # --block keeps the node's processes in this process group, so stopping the group stops
    # this head alone. A short grace: the head takes about 30 s to stop on SIGTERM, and
    # nothing is left to save once the tests are done.
    with process_group(start, grace_s=5, env=env, stdout=subprocess.DEVNULL) as node:
        _wait_for_ports(node, [ports["client"], ports["dashboard"]])
        yield {
            "ports": ports,
            "env": env,
            "config": config,
            "config_path": config_path,
            "root": root,
        }


def _spec(tmp_path: Path, key: str, steps: int = 4) -> Path:
    """The example chain, with few steps for the tiny model and its own idempotency key."""
    example = json.loads((ROOT / "jobs/examples/chain.json").read_text())
    ChainSpec.model_validate(example)
    example.update(steps=steps, idempotency_key=key)
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(example))
    return path


def test_a_chain_runs_through_ray_client(head, tmp_path):
    address = f"ray://127.0.0.1:{head['ports']['client']}"
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "fisedit.cli",
        "submit",
        str(_spec(tmp_path, "through-ray-client")),
        "--start",
        "--address",
        address,
        "--config",
        str(head["config_path"]),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, env=head["env"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["state"] == "succeeded"
    assert [edit["version"] for edit in report["edits"]] == [1, 2, 3]
    assert all(path == "hit" for path in report["service"]["cache_paths"])
    assert {p.name for p in out.glob("*.png")} >= {"base.png", "edit_3.png", "mask_3.png"}


def test_the_ray_jobs_entrypoint_runs_the_example_chain(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://127.0.0.1:{head['ports']['dashboard']}")
    entrypoint = (
        f"{sys.executable} jobs/edit_chain.py {_spec(tmp_path, 'through-ray-jobs', steps=3)} "
        f"--config {head['config_path']}"
    )
    uploaded = {"working_dir": str(ROOT), "excludes": [".git", ".venv", "out", "bench"]}
    job = client.submit_job(entrypoint=entrypoint, runtime_env=uploaded)
    wait_until(lambda: client.get_job_status(job).is_terminal(), "finished job", TIMEOUT, 1)
    logs = client.get_job_logs(job)

    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    tenant = head["root"] / "store/tenants/local"
    job_id = (tenant / "jobs/by-key/through-ray-jobs").read_text()
    record = json.loads((tenant / f"jobs/{job_id}.json").read_text())
    assert record["state"] == "succeeded" and job_id in logs
    assert [r["version"] for r in record["results"]] == [1, 2, 3]
    for result in record["results"]:
        assert (tenant / result["image_key"]).is_file()
