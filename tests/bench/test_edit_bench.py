"""The benchmark's CPU smoke run, exactly as CI and the README run it."""

import json
import subprocess
import sys
import threading

import pytest
import torch

from fisedit.bench.edit_bench import (
    NOISY_SPREAD,
    PROMPT,
    BenchResults,
    BenchRun,
    Clock,
    ModelBench,
    Timing,
    irregular_mask,
    run_benchmark,
    square_mask,
    table_row,
)
from fisedit.engine import Engine, EngineConfig


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.30])
def test_masks_cover_the_requested_ratio(ratio):
    assert square_mask(64, ratio).float().mean() == pytest.approx(ratio, abs=0.02)
    assert irregular_mask(64, ratio).float().mean() == pytest.approx(ratio, abs=0.01)


def test_square_masks_are_aligned_to_blocks():
    mask = square_mask(32, 0.3)
    rows = torch.nonzero(mask.any(dim=1)).flatten()

    assert rows[0] % 2 == 0 and len(rows) % 2 == 0


def test_timings_are_medians_with_their_relative_spread():
    assert Timing.of([10.0, 12.0, 11.0]) == Timing(11.0, 2 / 11)
    assert Timing.of([5.0]) == Timing(5.0, 0.0)


def _run(**spread: float) -> BenchRun:
    noisy = any(value > NOISY_SPREAD for value in spread.values())
    return BenchRun(
        model="tiny", method="fisedit", mask="square-5", mask_ratio=0.05, k=0,
        dense_step_ms=600.0, sparse_step_ms=200.0, end_to_end_ms=1000.0, mac_fraction=0.14,
        spread=spread, noisy=noisy,
    )  # fmt: skip


def test_a_row_shows_each_spread_and_flags_a_noisy_case():
    steady = table_row(_run(dense_step=0.02, sparse_step=0.1, end_to_end=0.05))
    noisy = table_row(_run(dense_step=0.02, sparse_step=0.9, end_to_end=0.05))

    assert "600.0 ±  2%" in steady and "200.0 ± 10%" in steady and "NOISY" not in steady
    assert "200.0 ± 90%" in noisy and noisy.endswith("NOISY")


def test_cpu_smoke_run_writes_well_formed_results(tmp_path):
    command = [sys.executable, "-m", "fisedit.cli", "bench", "--device", "cpu", "--tiny"]
    command += ["--compare-sparse", "cached_keys_values=true"]
    with subprocess.Popen(
        [*command, "--out", str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as bench:
        watchdog = threading.Timer(1200, bench.kill)  # reading its output has no timeout
        watchdog.start()
        try:
            # Each case is printed as it finishes: the first arrives while the others run,
            # and is already in the results, so a run stopped part-way keeps it.
            first_case = next(line for line in bench.stdout if line.startswith("tiny "))
            still_running = bench.poll() is None
            (partial,) = tmp_path.glob("cpu-*.json")
            written_first = json.loads(partial.read_text())["runs"][0]
            rest = bench.stdout.read()
        finally:
            watchdog.cancel()
    assert bench.returncode == 0 and still_running and "dense-eager" in first_case
    assert written_first["method"] == "dense-eager"

    (result,) = tmp_path.glob("cpu-*.json")
    assert result.with_suffix(".png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.partial"))
    data = json.loads(result.read_text())
    assert data["device"] == "cpu" and data["steps"] == 12
    assert data["sparse"]["kernels"] == "auto" and data["sparse"]["block_size"] == 2
    assert [config["cached_keys_values"] for config in data["compared"]] == [True]
    assert data["channels_last"] is True and data["cuda_graphs"] is True
    assert data["errors"] == []
    runs = data["runs"]
    assert len([line for line in rest.splitlines() if line.startswith("tiny ")]) == len(runs) - 1
    for run in runs:  # medians with their spread, noisy exactly where a spread is too wide
        sparse = {"sparse_step"} if run["method"].startswith("fisedit") else set()
        expected = {"dense_step", "end_to_end"} | sparse
        assert set(run["spread"]) == expected and all(v >= 0 for v in run["spread"].values())
        assert run["noisy"] == any(v > NOISY_SPREAD for v in run["spread"].values())
        assert run["spread"]["end_to_end"] > 0  # repeated on CPU
    compared = "fisedit cached_keys_values=True"
    assert {r["method"] for r in runs} == {"dense-eager", "fisedit", compared}
    assert all(r["model"] == "tiny" for r in runs)
    edits = [r for r in runs if r["method"] == "fisedit"]
    # The compared config's edit, side by side: the same mask, fewer MACs, a larger cache.
    (other,) = (r for r in runs if r["method"] == compared)
    (same,) = (r for r in edits if r["mask"] == other["mask"] == "square-15" and r["k"] == 0)
    assert other["mask_ratio"] == same["mask_ratio"] and other["sparse_step_ms"] > 0
    assert other["sparse_step_mac_fraction"] < same["sparse_step_mac_fraction"]
    assert other["cache_bytes"] > same["cache_bytes"]
    assert {r["mask"] for r in edits} == {"square-5", "square-15", "square-30", "irregular-15"}
    assert {r["k"] for r in edits} == {0, 3, 10}
    for run in edits:
        assert 0 < run["mask_ratio"] < 0.5
        assert 0 < run["mac_fraction"] < 1
        assert run["sparse_step_ms"] > 0 and run["end_to_end_ms"] > 0
        assert run["cache_bytes"] > 0
        assert run["first_edit_ms"] > 0 and run["graph_capture_ms"] == 0  # no graphs on CPU
        expected = run["dense_step_ms"] * run["sparse_step_mac_fraction"] / run["sparse_step_ms"]
        assert run["sparse_step_efficiency"] == pytest.approx(expected)
    supplied = sorted((r for r in edits if r["k"] == 0 and r["mask"].startswith("square")),
                      key=lambda r: r["mask_ratio"])  # fmt: skip
    assert [r["mac_fraction"] for r in supplied] == sorted(r["mac_fraction"] for r in supplied)
    layers = {layer["layer"]: layer for layer in data["layers"]}
    assert {"conv_in", "conv_out", "down_blocks.0.resnets.0", "mid_block.resnets.0"} <= set(layers)
    assert all(layer["dense_ms"] > 0 and layer["sparse_ms"] > 0 for layer in layers.values())
    # At the latent resolution only the mask's blocks are active; 8x8 layers run dense.
    assert 0 < layers["conv_in"]["active_fraction"] < 0.5
    assert layers["mid_block.resnets.0"]["active_fraction"] == 1.0
    # The kernel profile: on CPU, PyTorch operators per step, most time first; the compared
    # config's sparse step has one of its own.
    kernels = {("fisedit", "dense"): {}, ("fisedit", "sparse"): {}, (compared, "sparse"): {}}
    for kernel in data["kernels"]:
        times = kernels[kernel["method"], kernel["step"]]
        times[kernel["kernel"]] = (kernel["calls"], kernel["ms"])
    assert all(kernels.values())
    for times in kernels.values():
        assert all(calls > 0 and ms >= 0 for calls, ms in times.values())
        assert [ms for _, ms in times.values()] == sorted(
            (ms for _, ms in times.values()), reverse=True
        )
    # A sparse step runs GroupNorm only where its layer runs dense; where it runs sparse,
    # the statistics are merged from blocks (no reduction of the whole map).
    dense, sparse = kernels["fisedit", "dense"], kernels["fisedit", "sparse"]
    assert 0 < sparse["aten::native_group_norm"][0] < dense["aten::native_group_norm"][0]
    assert "aten::var_mean" not in sparse
    assert "costliest kernels of the tiny sparse step (" in rest
    assert f"costliest kernels of the tiny sparse step ({compared}) (" in rest


def test_a_run_writes_one_pair_of_files_named_by_the_day_it_started(tmp_path):
    # Cases are written as they finish; a run that goes past midnight must not start a
    # second file under the new date.
    results = BenchResults("cpu", tmp_path, {"date": "2001-02-03"})
    results.add([_run(dense_step=0.02, sparse_step=0.1, end_to_end=0.05)])
    results.add([_run(dense_step=0.02, sparse_step=0.9, end_to_end=0.05)])

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu-2001-02-03.json",
        "cpu-2001-02-03.png",
    ]
    data = json.loads((tmp_path / "cpu-2001-02-03.json").read_text())
    assert data["date"] == "2001-02-03"
    assert [run["noisy"] for run in data["runs"]] == [False, True]


def test_a_failing_model_is_recorded_and_what_was_measured_is_kept(tmp_path):
    path = run_benchmark("cpu", ("tiny", "no-such-model"), steps=4, repeats=1, out=tmp_path)

    data = json.loads(path.read_text())
    assert {run["model"] for run in data["runs"]} == {"tiny"}
    assert {run["method"] for run in data["runs"]} == {"dense-eager", "fisedit"}
    (error,) = data["errors"]
    assert error["what"] == "no-such-model" and error["error"].startswith("KeyError")


def test_on_a_gpu_the_timed_sparse_step_is_the_eager_one_replayed(
    tiny_model_dir, static_step_engine
):
    # The engine's graph path (captured on a GPU): it must compute what the eager step
    # computes, and record into a cache of its own, leaving the edited version's alone.
    outputs = []
    for engine_class in (Engine, static_step_engine):
        engine = engine_class.from_pretrained(tiny_model_dir, EngineConfig(progress=False))
        base = engine.generate(PROMPT, steps=4, seed=0)
        cache = base.current.cache
        before = {name: tensor.clone() for name, tensor in cache.tensors.items()}
        torch.manual_seed(0)  # the bench's random latents
        bench = ModelBench("tiny", engine.model, steps=4, clock=Clock(engine.model.device))
        step = bench.sparse_call(engine, base, square_mask(engine.model.latent_shape[1], 0.15))
        outputs.append([getattr(out, "sample", out).clone() for out in (step(), step())])

        assert cache.graphs == {}
        assert all(torch.equal(cache.tensors[name], t) for name, t in before.items())
    eager, static = outputs
    assert all(torch.equal(s, e) for s, e in zip(static, eager, strict=True))
    assert torch.equal(eager[0], eager[1])


def test_edits_are_timed_as_a_session_makes_them_leaving_the_generation_alone(
    tiny_model_dir, static_step_engine
):
    engine = static_step_engine.from_pretrained(tiny_model_dir, EngineConfig(progress=False))
    base = engine.generate(PROMPT, steps=4, seed=0)
    before = {name: tensor.clone() for name, tensor in base.current.cache.tensors.items()}
    bench = ModelBench("tiny", engine.model, steps=4, clock=Clock(engine.model.device))
    mask = square_mask(engine.model.latent_shape[1], 0.15)

    run = bench.fisedit(engine, base, "square-15", mask, 1, Timing(100.0, 0.0), repeats=1)

    assert (run.method, run.mask, run.k) == ("fisedit", "square-15", 1)
    assert 0 < run.mac_fraction < 1 and run.end_to_end_ms > 0
    assert run.spread["end_to_end"] > 0  # three edits after the first, on CPU
    assert base.version == 0 and len(base.history) == 1
    assert all(torch.equal(base.current.cache.tensors[n], t) for n, t in before.items())


# What the GPU machine lacks (bench/README.md): there, importing any of them fails.
NOT_ON_THE_GPU_MACHINE = ["ray", "boto3", "botocore", "moto", "fastapi", "starlette", "uvicorn"]


def test_the_bench_runs_where_neither_ray_nor_boto3_is_installed(tmp_path, python_without):
    script = (
        "import runpy, sys\n"
        "sys.argv = ['fisedit', *sys.argv[1:]]\n"
        "runpy.run_module('fisedit.cli', run_name='__main__')\n"
    )
    options = ["--device", "cpu", "--tiny", "--steps", "2", "--repeats", "1"]
    args = ("bench", *options, "--out", str(tmp_path))
    result = python_without(NOT_ON_THE_GPU_MACHINE, script, *args)

    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("cpu-*.json")
    data = json.loads(path.read_text())
    assert data["errors"] == [] and {run["method"] for run in data["runs"]} == {
        "dense-eager",
        "fisedit",
    }
