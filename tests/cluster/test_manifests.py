"""cluster/: every definition parses, and each provides what the service asks of it.

The example service configs must fit the clusters they are written for (GPUs and custom
resources per worker, how many workers), every definition must run the Ray this package is
tested with and use the standard ports, and the service config must reach the nodes at the path
FISEDIT_CONFIG names. The local cluster script is run for real: a head and one worker node.
"""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.deployment import Application

from fisedit.service.config import ServiceConfig

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
SCRIPT = CLUSTER / "local_cluster.sh"
GCS_PORT, CLIENT_PORT, DASHBOARD_PORT, SERVE_PORT = 6379, 10001, 8265, 8000
RAY_MINOR = ".".join(version("ray").split(".")[:2])


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def service_config(name: str) -> ServiceConfig:
    return ServiceConfig.from_yaml(CLUSTER / "examples" / name)


def kuberay_cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of each KubeRay manifest."""
    return {
        "kuberay-raycluster.yaml": load("kuberay-raycluster.yaml")["spec"],
        "kuberay-rayservice.yaml": load("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def only(items: list) -> Any:
    assert len(items) == 1, items
    return items[0]


def cpu_quantity(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("7", "500m") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def images(node: Any) -> list[str]:
    """Every `image:` value anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [image for value in node.values() for image in images(value)]
    if isinstance(node, list):
        return [image for item in node for image in images(item)]
    return []


def option(command: str, name: str) -> str:
    """The value of `--name=value` in a ray start command line."""
    return only(re.findall(rf"--{name}=(\S+)", command))


# --- every file -----------------------------------------------------------------------------


def test_every_yaml_in_cluster_parses_to_a_mapping():
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.name for p in paths} >= {
        "autoscaler.yaml",
        "kuberay-raycluster.yaml",
        "kuberay-rayservice.yaml",
        "service-gpu.yaml",
        "service-local.yaml",
    }
    for path in paths:
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(d, dict) for d in documents), path


def test_example_service_configs_load_with_the_resources_their_clusters_offer():
    gpu = service_config("service-gpu.yaml")
    assert gpu.worker_resources.num_gpus == 1 and gpu.worker_resources.resources == {}
    assert gpu.engine.device == "cuda"
    assert gpu.store.url.startswith("s3://") and gpu.store.endpoint_url

    local = service_config("service-local.yaml")
    assert local.worker_resources.num_gpus == 0
    assert local.worker_resources.resources == {"edit_slot": 1}
    assert local.engine.device == "cpu" and local.model == "tiny"
    # Every node of the one-machine cluster must see the same store directory.
    assert Path(local.store.url).is_absolute()


# --- the cluster launcher (autoscaler) ------------------------------------------------------


def test_launcher_gpu_workers_hold_the_gpu_service_config():
    launcher, service = load("autoscaler.yaml"), service_config("service-gpu.yaml")
    node_types = launcher["available_node_types"]
    head = node_types[launcher["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "EditWorkers must not land on the head"

    gpu_type = only([t for t in node_types.values() if t["resources"].get("GPU", 0) > 0])
    wants = service.worker_resources
    assert gpu_type["resources"]["GPU"] >= wants.num_gpus
    assert gpu_type["resources"]["CPU"] >= wants.num_cpus
    workers_per_node = gpu_type["resources"]["GPU"] // wants.num_gpus
    assert gpu_type["max_workers"] * workers_per_node >= service.workers
    assert gpu_type["min_workers"] <= gpu_type["max_workers"] <= launcher["max_workers"]


def test_launcher_places_the_gpu_config_where_fisedit_config_points():
    launcher = load("autoscaler.yaml")
    env = dict(
        opt.removeprefix("--env ").split("=", 1)
        for opt in launcher["docker"]["run_options"]
        if opt.startswith("--env ")
    )
    assert launcher["file_mounts"][env["FISEDIT_CONFIG"]] == "cluster/examples/service-gpu.yaml"
    assert env["RAY_AUTH_MODE"] == "token"
    # The package itself is installed from the synced checkout.
    source = only([remote for remote, local in launcher["file_mounts"].items() if local == "."])
    assert any(source in command for command in launcher["setup_commands"])


# --- KubeRay --------------------------------------------------------------------------------


def test_kuberay_manifests_are_ray_io_v1_with_token_auth():
    assert load("kuberay-raycluster.yaml")["apiVersion"] == "ray.io/v1"
    assert load("kuberay-raycluster.yaml")["kind"] == "RayCluster"
    assert load("kuberay-rayservice.yaml")["apiVersion"] == "ray.io/v1"
    assert load("kuberay-rayservice.yaml")["kind"] == "RayService"
    for spec in kuberay_cluster_specs().values():
        assert spec["authOptions"] == {"mode": "token"}


def test_rayservice_runs_on_the_same_cluster_as_the_raycluster():
    specs = kuberay_cluster_specs()
    assert specs["kuberay-rayservice.yaml"] == specs["kuberay-raycluster.yaml"]


@pytest.mark.parametrize("manifest", ["kuberay-raycluster.yaml", "kuberay-rayservice.yaml"])
def test_kuberay_gpu_group_holds_the_gpu_service_config(manifest):
    spec, service = kuberay_cluster_specs()[manifest], service_config("service-gpu.yaml")
    wants = service.worker_resources
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"

    group = only(spec["workerGroupSpecs"])
    container = only(group["template"]["spec"]["containers"])
    gpus = int(group["rayStartParams"]["num-gpus"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert gpus >= wants.num_gpus
    assert cpu_quantity(container["resources"]["limits"]["cpu"]) >= wants.num_cpus
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] * (gpus // wants.num_gpus) >= service.workers


@pytest.mark.parametrize("manifest", ["kuberay-raycluster.yaml", "kuberay-rayservice.yaml"])
def test_every_kuberay_pod_mounts_the_service_config_where_fisedit_config_points(manifest):
    spec = kuberay_cluster_specs()[manifest]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        config_volume = only([v for v in pod["volumes"] if "configMap" in v])
        assert config_volume["configMap"]["name"] == "fisedit-service"
        container = only(pod["containers"])
        mount = only([m for m in container["volumeMounts"] if m["name"] == config_volume["name"]])
        env = {e["name"]: e["value"] for e in container["env"]}
        # The ConfigMap is made from the example with the key service.yaml (cluster/README.md).
        assert env["FISEDIT_CONFIG"] == f"{mount['mountPath']}/service.yaml"


def test_rayservice_serves_an_app_from_fisedit_service():
    serve_config = yaml.safe_load(load("kuberay-rayservice.yaml")["spec"]["serveConfigV2"])
    app = only(serve_config["applications"])
    module, attribute = app["import_path"].split(":")
    assert module.startswith("fisedit.service.")
    assert isinstance(getattr(importlib.import_module(module), attribute), Application)
    assert serve_config["http_options"]["port"] == SERVE_PORT


# --- across all definitions -----------------------------------------------------------------


def test_every_definition_runs_the_installed_ray_minor_version():
    launcher_image = load("autoscaler.yaml")["docker"]["image"]
    assert launcher_image.startswith(f"rayproject/ray:{RAY_MINOR}.")
    for manifest, spec in kuberay_cluster_specs().items():
        assert spec["rayVersion"].startswith(f"{RAY_MINOR}."), manifest
        # Our image is rayproject/ray plus this package, tagged with the Ray it is built on.
        for image in images(spec):
            assert f"-ray{RAY_MINOR}." in image, (manifest, image)


def test_every_definition_uses_the_standard_ports():
    script = SCRIPT.read_text()
    for variable, port in [
        ("GCS_PORT", GCS_PORT),
        ("CLIENT_PORT", CLIENT_PORT),
        ("DASHBOARD_PORT", DASHBOARD_PORT),
    ]:
        assert re.search(rf"^{variable}={port}$", script, re.MULTILINE), variable

    launcher = load("autoscaler.yaml")
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert option(head_start, "port") == str(GCS_PORT)
    assert option(head_start, "ray-client-server-port") == str(CLIENT_PORT)
    assert option(head_start, "dashboard-port") == str(DASHBOARD_PORT)
    worker_start = " ".join(launcher["worker_start_ray_commands"])
    assert option(worker_start, "address") == f"$RAY_HEAD_IP:{GCS_PORT}"

    for manifest, spec in kuberay_cluster_specs().items():
        head = only(spec["headGroupSpec"]["template"]["spec"]["containers"])
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        expected = {
            "gcs-server": GCS_PORT,
            "client": CLIENT_PORT,
            "dashboard": DASHBOARD_PORT,
            "serve": SERVE_PORT,
        }
        assert ports == expected, manifest


# --- the local cluster script, run for real -------------------------------------------------

# Connects with the environment the script's `env` prints, and places one actor with the
# local service config's worker resources: it must fit, and only on a worker node.
PROBE = """
import json, sys, time
import ray

ray.init(logging_level="ERROR")
deadline = time.monotonic() + 30
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)

@ray.remote
class Where:
    def node(self):
        return ray.get_runtime_context().get_node_id()

wants = json.loads(sys.argv[1])
where = Where.options(**wants).remote()
nodes = [
    {"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
]
print(json.dumps({"nodes": nodes, "actor_node": ray.get(where.node.remote(), timeout=60)}))
"""


@pytest.fixture
def ray_temp_dir() -> Iterator[Path]:
    # Short and under /tmp: Ray's socket paths live in it and must stay under 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="fisedit-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a process that is not a zombie."""
    ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True)
    return any(
        int(fields[0]) == pgid and not fields[1].startswith("Z")
        for fields in (line.split() for line in ps.stdout.splitlines())
    )


def test_local_cluster_script_starts_a_head_and_a_worker_with_fake_gpus(ray_temp_dir, free_port):
    env = dict(os.environ)
    # The venv's `ray` first on PATH; no address or token of the caller's leaks in.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)

    def script(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args, "--temp-dir", str(ray_temp_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    ports = [str(free_port()) for _ in range(3)]
    wants = service_config("service-local.yaml").worker_resources
    try:
        up = script(
            "up", "1", "--auth", "token", "--port", ports[0], "--client-port", ports[1],
            "--dashboard-port", ports[2], "--object-store-mb", "80", timeout=180,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        state = (ray_temp_dir / "local_cluster.state").read_text()
        pgids = [int(p) for p in re.search(r"NODE_PGIDS='([\d ]+)'", state)[1].split()]

        exports = script("env", timeout=30)
        assert exports.returncode == 0, exports.stderr
        client_env = dict(env)
        for name, value in re.findall(r"^export (\w+)=(\S+)$", exports.stdout, re.MULTILINE):
            client_env[name] = value
        assert client_env["RAY_ADDRESS"].endswith(f":{ports[0]}")
        assert client_env["RAY_AUTH_MODE"] == "token"

        probe = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(wants.model_dump())],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        down = script("down", timeout=120)

    assert down.returncode == 0, down.stderr
    assert not [pgid for pgid in pgids if group_alive(pgid)]

    assert len(seen["nodes"]) == 2
    head, worker = sorted(seen["nodes"], key=lambda n: "GPU" in n["resources"])
    assert "GPU" not in head["resources"] and "edit_slot" not in head["resources"]
    assert worker["resources"]["GPU"] == 1 and worker["resources"]["edit_slot"] == 1
    assert worker["resources"]["CPU"] >= wants.num_cpus
    assert seen["actor_node"] == worker["id"]
