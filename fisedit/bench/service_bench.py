"""Service benchmark: S concurrent sessions x E edits over W workers through the router.

The same workload runs twice on one local Ray, side by side: with session affinity (each
edit goes to the worker holding the session's cache) and without (each edit goes to a
random worker, which must restore the session from the snapshot its holder writes). It
prints and writes the cache hit rate, p50/p95 edit latency and edits per second of each.

    python -m fisedit.bench.service_bench --sessions 4 --edits 3 --workers 2 \
        --out bench/results
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

SUBJECTS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "bear", "duck"]
CHANGES = ["on a red bench", "on a red bench at night", "on a red bench in the snow"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_workload(client, sessions: int, edits: int, steps: int, seed: int = 0) -> dict:
    """Generates `sessions` sessions at once, then edits each of them `edits` times, all
    sessions concurrently in every round; returns the figures of the edits."""
    subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(sessions)]
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        generated = list(
            pool.map(
                lambda s: client.generate(f"a photo of a {s} on a bench", seed=seed, steps=steps),
                subjects,
            )
        )

        def edit(args: tuple) -> tuple[float, object]:
            result, subject, change = args
            start = time.perf_counter()
            edited = client.edit(
                result.session_id, f"a photo of a {subject} {change}", extends=result.version
            )
            return time.perf_counter() - start, edited

        latencies, paths = [], []
        current = generated
        start = time.perf_counter()
        for round_ in range(edits):
            change = CHANGES[round_ % len(CHANGES)]
            done = list(
                pool.map(edit, [(r, s, change) for r, s in zip(current, subjects, strict=True)])
            )
            latencies += [seconds for seconds, _ in done]
            paths += [result.cache_path for _, result in done]
            current = [result for _, result in done]
        wall = time.perf_counter() - start
    return {
        "edits": len(latencies),
        "hit_rate": paths.count("hit") / len(paths),
        "cache_paths": {path: paths.count(path) for path in sorted(set(paths))},
        "p50_edit_s": statistics.median(latencies),
        "p95_edit_s": _percentile(latencies, 0.95),
        "edits_per_s": len(latencies) / wall,
        "wall_s": wall,
    }


def run_benchmark(
    model: str, sessions: int, edits: int, workers: int, steps: int, out: Path | None
) -> dict:
    """Runs the workload with affinity on and off on one local Ray; writes the JSON."""
    import ray

    from fisedit.engine.config import EngineConfig
    from fisedit.service import deploy
    from fisedit.service.client import Client
    from fisedit.service.commands import DEMO_WORKER_RESOURCE, start_local_ray
    from fisedit.service.config import ServiceConfig, StoreConfig, WorkerResources

    start_local_ray(workers)
    runs = []
    try:
        for affinity in (True, False):
            with tempfile.TemporaryDirectory() as store:
                config = ServiceConfig(
                    model=model,
                    engine=EngineConfig(progress=False),
                    store=StoreConfig(url=store),
                    namespace=f"fisedit-bench-{'affinity' if affinity else 'random'}",
                    workers=workers,
                    worker_resources=WorkerResources(
                        num_cpus=0, resources={DEMO_WORKER_RESOURCE: 1}
                    ),
                    affinity=affinity,
                )
                deploy.start(config)
                try:
                    figures = run_workload(Client(config=config), sessions, edits, steps)
                finally:
                    deploy.stop(config)
            runs.append({"affinity": affinity, **figures})
            print(
                f"affinity {'on ' if affinity else 'off'}: hit rate {figures['hit_rate']:.0%}, "
                f"p50 {figures['p50_edit_s']:.2f} s, p95 {figures['p95_edit_s']:.2f} s, "
                f"{figures['edits_per_s']:.2f} edits/s, paths {figures['cache_paths']}",
                flush=True,
            )
    finally:
        ray.shutdown()
    result = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "date": date.today().isoformat(),
        "model": model,
        "sessions": sessions,
        "edits_per_session": edits,
        "workers": workers,
        "steps": steps,
        "runs": runs,
        "affinity_speedup_p50": runs[1]["p50_edit_s"] / runs[0]["p50_edit_s"],
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"service-cpu-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="service model (default: tiny)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions (4)")
    parser.add_argument("--edits", type=int, default=3, help="edits per session (3)")
    parser.add_argument("--workers", type=int, default=2, help="edit workers (2)")
    parser.add_argument("--steps", type=int, default=10, help="denoise steps (10)")
    parser.add_argument("--out", default=None, help="directory for the JSON (none: print)")
    args = parser.parse_args(argv)
    run_benchmark(
        args.model,
        args.sessions,
        args.edits,
        args.workers,
        args.steps,
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
