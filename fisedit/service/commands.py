"""The service's commands of the `fisedit` CLI: demo, up, down and submit.

`fisedit demo` runs the whole service on one machine (a local Ray, two workers, the local
directory store, the tiny model) and submits an edit-chain job through the client;
`up`/`down` start and stop the service's actors on a running cluster, and `submit` runs a
chain spec there with a progress bar. `jobs/edit_chain.py` is `submit` as a Ray Jobs
entrypoint.
"""

import argparse
import json
import sys
from pathlib import Path

from fisedit.service.bulk_records import BulkDefaults

DEMO_WORKER_RESOURCE = "edit_slot"


def start_local_ray(workers: int, namespace: str | None = None) -> None:
    """A local Ray sized for this machine, with one DEMO_WORKER_RESOURCE per edit worker
    (the demo and the service benchmark place their workers on it)."""
    import ray

    ray.init(
        num_cpus=2,
        resources={DEMO_WORKER_RESOURCE: workers},
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=False,
    )


def service_config(path: str | None):
    """The service config from a YAML file, or the embedded defaults."""
    from fisedit.service.config import ServiceConfig

    return ServiceConfig.from_yaml(path) if path else ServiceConfig()


def follow(client, job_id: str, timeout_s: float):
    """Waits for a job with a progress bar over its edits; returns its final record."""
    from tqdm.auto import tqdm

    with tqdm(desc=f"job {job_id[:8]}", unit="edit", file=sys.stderr) as bar:

        def show(record) -> None:
            done, total = record.progress
            bar.total = total
            bar.n = done
            bar.set_postfix_str(record.state)
            bar.refresh()

        return client.wait(job_id, timeout=timeout_s, on_progress=show)


def save_results(client, record, out: Path, edit_config) -> dict:
    """Writes a finished job's images, region previews and reports under `out`; returns the
    summary it also writes as report.json. `edit_config` (the service's EditConfig) says how
    far the blended seam reaches around each recomputed region."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from fisedit.engine.images import blend_weight, preview_edit

    out.mkdir(parents=True, exist_ok=True)

    def fetch(key: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(client.read(key))))

    def save(name: str, image: np.ndarray) -> None:
        Image.fromarray(image).save(out / name)
        print(f"wrote {out / name}")

    if record.generated is not None:
        save("base.png", fetch(record.generated.image_key))
    for result in record.results:
        image = fetch(result.image_key)
        save(f"edit_{result.version}.png", image)
        if result.mask_key is not None:
            mask = torch.from_numpy(fetch(result.mask_key) > 0)
            weight = blend_weight(
                mask, image.shape[:2], edit_config.seam_dilation, edit_config.seam_feather
            )
            save(f"mask_{result.version}.png", preview_edit(image, mask, weight))
    summary = {
        "job_id": record.job_id,
        "state": record.state,
        "error": record.error,
        "session_id": record.session_id,
        "base": None if record.generated is None else record.generated.model_dump(mode="json"),
        "edits": [result.model_dump(mode="json") for result in record.results],
        "service": {
            "cache_paths": [result.cache_path for result in record.results],
            "workers": [result.worker_id for result in record.results],
            "hits": sum(result.cache_path == "hit" for result in record.results),
        },
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'report.json'}")
    return summary


def demo(args: argparse.Namespace, prompts: list[str]) -> None:
    """Runs the service on this machine (local Ray, two workers, a local directory store,
    the tiny model by default) and submits a job: generate `prompts[0]`, then edit the
    image to each of the others in turn."""
    import ray

    from fisedit.engine.config import EngineConfig
    from fisedit.engine.models import check_model_source
    from fisedit.service import deploy
    from fisedit.service.client import Client
    from fisedit.service.config import ServiceConfig, StoreConfig, WorkerResources

    check_model_source(args.model)
    out = Path(args.out)
    config = ServiceConfig(
        model=args.model,
        engine=EngineConfig(device=args.device, dtype=args.dtype, progress=False),
        store=StoreConfig(url=str((out / "store").resolve())),
        workers=2,
        worker_resources=WorkerResources(num_cpus=0, resources={DEMO_WORKER_RESOURCE: 1}),
    )
    print("starting a local Ray with two edit workers", file=sys.stderr)
    start_local_ray(config.workers, config.namespace)
    try:
        deploy.start(config)
        client = Client(config=config)
        job_id = client.submit_chain(
            {
                "prompt": prompts[0],
                "seed": args.seed,
                "steps": args.steps,
                "scheduler": args.scheduler,
                "edits": [{"prompt": prompt} for prompt in prompts[1:]],
            }
        )
        # One call per prompt (the generation, then each edit), each within call_timeout_s.
        record = follow(client, job_id, timeout_s=config.call_timeout_s * len(prompts))
        summary = save_results(client, record, out, config.engine.edit)
        for edit in summary["edits"]:
            print(
                f"edit {edit['version']}: mask {edit['mask_ratio']:.1%}, MACs "
                f"{edit['mac_fraction']:.1%} of dense, {edit['latency_s']:.2f} s on "
                f"{edit['worker_id']} (cache {edit['cache_path']})"
            )
        if record.state != "succeeded":
            raise SystemExit(f"error: the demo job {record.state}: {record.error}")
    finally:
        deploy.stop(config)
        ray.shutdown()


def up(args: argparse.Namespace) -> None:
    """Starts the service's actors (workers, router, job queue) on a running Ray cluster."""
    import ray

    from fisedit.service import deploy

    config = service_config(args.config)
    ray.init(address=args.address, namespace=config.namespace)
    deploy.start(config)
    print(
        f"service up in namespace {config.namespace!r}: {config.workers} workers, "
        f"model {config.model!r}, store {config.store.url}"
    )


def down(args: argparse.Namespace) -> None:
    """Stops the service's actors; job records and results stay in the store."""
    import ray

    from fisedit.service import deploy

    config = service_config(args.config)
    ray.init(address=args.address, namespace=config.namespace)
    deploy.stop(config, drain=args.drain)
    print(f"service in namespace {config.namespace!r} stopped")


def submit(args: argparse.Namespace) -> None:
    """Submits an edit-chain spec (JSON) and follows it to the end with a progress bar."""
    from fisedit.service.client import Client
    from fisedit.service.jobs import ChainSpec

    spec_path = Path(args.spec)
    if not spec_path.is_file():
        raise FileNotFoundError(f"spec {spec_path} not found")
    spec = ChainSpec.model_validate_json(spec_path.read_text())
    config = service_config(args.config)
    client = Client(address=args.address, config=config)
    if args.start:
        from fisedit.service import deploy

        deploy.start(config)
    job_id = client.submit_chain(spec)
    print(f"submitted job {job_id}", file=sys.stderr)
    record = follow(client, job_id, timeout_s=args.timeout)
    if args.out:
        save_results(client, record, Path(args.out), config.engine.edit)
    else:
        print(record.model_dump_json(indent=2, exclude={"events"}))
    if record.state != "succeeded":
        raise SystemExit(f"error: job {job_id} {record.state}: {record.error}")


def add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `fisedit bulk` (and of jobs/bulk_variations.py)."""
    parser.add_argument(
        "input", help="JSONL or Parquet dataset: a local path or s3:// URL (required)"
    )
    parser.add_argument(
        "--out",
        help="store URL (directory or s3://bucket/prefix) (default: the config's store)",
    )
    parser.add_argument("--run", required=True, help="run id; re-running it resumes (required)")
    parser.add_argument("--config", help="service config YAML (default: embedded defaults)")
    parser.add_argument("--model", help="overrides the config's model (default: the config's)")
    parser.add_argument("--endpoint-url", help="S3 endpoint, e.g. MinIO (default: AWS)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="actors, each reserving the config's worker_resources, e.g. one GPU "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--actor-cpus",
        type=float,
        help="CPUs per actor (default: the config's worker_resources.num_cpus)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"steps of records without their own (default: {BulkDefaults().steps})",
    )
    parser.add_argument(
        "--mask-steps",
        type=int,
        help="dense capture steps per edit, k (default: the config's engine.edit.mask_steps, "
        "else a fifth of the steps)",
    )
    parser.add_argument("--max-groups", type=int, help="stop after this many groups (default: all)")
    parser.add_argument(
        "--address", help="Ray cluster address (default: connect to one or start a local one)"
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `fisedit serve`."""
    parser.add_argument(
        "--config",
        help="service config YAML (default: one worker, the tiny model, the local store, "
        "anonymous on 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, help="HTTP port (default: the config's http.port, else 8000)"
    )
    parser.add_argument(
        "--store", help="store directory or URL (default: the config's, else fisedit-store)"
    )
    parser.add_argument(
        "--model",
        help="diffusers directory, hub id or tiny (default: the config's, else tiny)",
    )


def bulk(args: argparse.Namespace) -> None:
    """Bulk-edits a prompt-variation dataset with Ray Data: each base prompt is generated
    once and every variation is a sparse edit of it; images, masks and a manifest go to the
    store. Re-running the same --run resumes it."""
    from fisedit.service.bulk import run_bulk_cli

    run_bulk_cli(args)


def serve(args: argparse.Namespace) -> None:
    """Runs the HTTP service on this machine (local Ray and Serve on 127.0.0.1: the tiny
    model, the local store, anonymous access) until Ctrl-C."""
    from fisedit.service.http import serve_command

    serve_command(args)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds up, down, submit, bulk and serve to the CLI's subcommands."""

    def cluster_command(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=function.__doc__)
        sub.set_defaults(function=function)
        sub.add_argument(
            "--address",
            default="auto",
            help="Ray cluster: auto (the running one), a GCS address or ray://host:port "
            "(default: auto)",
        )
        sub.add_argument("--config", help="service config YAML (default: embedded defaults)")
        return sub

    cluster_command("up", up, "start the service's actors on a running Ray cluster")
    sub = cluster_command("down", down, "stop the service's actors")
    sub.add_argument(
        "--drain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="snapshot every session the workers hold before stopping them (default: on)",
    )
    sub = cluster_command("submit", submit, "run an edit-chain spec (JSON) on the service")
    sub.add_argument("spec", help="edit-chain spec, JSON: see jobs/examples/ (required)")
    sub.add_argument(
        "--out",
        help="directory for images, masks and report.json (default: print the job record)",
    )
    sub.add_argument(
        "--start",
        action="store_true",
        help="start the service's actors if they are not up (default: off)",
    )
    sub.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait (default: 3600)"
    )
    for name, function, arguments, help in (
        ("bulk", bulk, add_bulk_arguments, "bulk-edit a prompt-variation dataset with Ray Data"),
        ("serve", serve, add_serve_arguments, "run the HTTP service on this machine"),
    ):
        sub = commands.add_parser(name, help=help, description=function.__doc__)
        sub.set_defaults(function=function)
        arguments(sub)
