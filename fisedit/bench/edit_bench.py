"""Side-by-side edit benchmark in one process on one device.

Dense diffusers eager, dense torch.compile with CUDA graphs (mode reduce-overhead) and
FISEdit, on full-size UNet shapes with random weights (no downloads), for masks covering
5%, 15% and 30% of the latent (centred squares and one irregular mask), with supplied masks
(no dense steps) and with k dense mask steps; then each layer's and each kernel's time in
a dense and a sparse step. Prints each case as it finishes, writes `<device>-<date>.json`
and a PNG of speedup against mask ratio with the MAC limit.

Every timing is a median over repeats, reported with its spread; on CPU, where other
processes disturb timings most, end-to-end runs are repeated too. A case whose timings
spread more than NOISY_SPREAD is flagged noisy: its comparisons are not meaningful.
"""

import datetime
import itertools
import json
import math
import re
import statistics
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from pydantic import BaseModel
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fisedit.engine.cache import ActivationCache
from fisedit.engine.config import EngineConfig, SparseConfig
from fisedit.engine.layers import MacCount
from fisedit.engine.model_shapes import UNET_SHAPES
from fisedit.engine.models import DiffusionModel, build_tiny_model, load_model
from fisedit.engine.plan import SparsePlan
from fisedit.engine.session import EditSession, Engine

PROMPT = "a photo of a cat sitting on a wooden bench in a park"
EDIT = "a photo of a dog sitting on a wooden bench in a park"
MODELS = ("sd15-512", "sd21-768", "sdxl-1024")
MASK_RATIOS = (0.05, 0.15, 0.30)
CPU_END_TO_END_REPEATS = 3
"""End-to-end runs per case on CPU (one on GPU, where they are long and steady)."""
NOISY_SPREAD = 0.25
"""A timing whose repeats spread (max - min) over more than this fraction of its median
cannot tell cases apart that differ by less, e.g. the speedups at 5, 15 and 30% masks."""


@dataclass(frozen=True)
class Timing:
    """The median of repeated wall times and their spread."""

    median_ms: float
    spread: float
    """(max - min) / median over the repeats; 0 for a single run."""

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        median = statistics.median(samples_ms)
        return cls(median, (max(samples_ms) - min(samples_ms)) / median)


class BenchRun(BaseModel):
    """One measured configuration; times are milliseconds."""

    model: str
    method: str
    mask: str | None
    mask_ratio: float
    k: int
    dense_step_ms: float
    sparse_step_ms: float | None
    end_to_end_ms: float
    mac_fraction: float
    sparse_step_mac_fraction: float | None = None
    sparse_step_efficiency: float | None = None
    cache_bytes: int | None = None
    peak_memory_bytes: int | None = None
    first_edit_ms: float | None = None
    """The case's first edit, which also compiles the kernels its mask needs and captures
    its sparse step's CUDA graph (not part of end_to_end_ms: later edits replay it)."""
    graph_capture_ms: float | None = None
    """Part of first_edit_ms spent capturing CUDA graphs."""
    spread: dict[str, float] = {}
    """Each timing's spread over its repeats, (max - min) / median: dense_step (for FISEdit,
    of the dense step it is compared with), sparse_step, end_to_end."""
    noisy: bool = False
    """Some timing spread more than NOISY_SPREAD: the case's comparisons are not meaningful."""


def _is_noisy(spread: dict[str, float]) -> bool:
    return any(value > NOISY_SPREAD for value in spread.values())


class LayerProfile(BaseModel):
    """One wrapped UNet layer's time in a dense and in a sparse (eager) step."""

    model: str
    layer: str
    kind: str
    resolution: tuple[int, int]
    active_fraction: float
    dense_ms: float
    sparse_ms: float


class KernelTime(BaseModel):
    """One kernel's time in an eager dense or sparse step, from torch.profiler: on a GPU a
    device kernel's time; on CPU, where nothing is launched, a PyTorch operator's self time."""

    model: str
    step: str
    """"dense" or "sparse"."""
    kernel: str
    method: str = "fisedit"
    """The config whose step it is: "fisedit", or a compared config's method (its sparse
    step only), where the profile says what its options cost."""
    calls: float
    """Launches per step."""
    ms: float
    """Milliseconds per step, all its launches together."""


def kernel_times(call: Callable[[], object], repeats: int, cuda: bool) -> dict[str, tuple]:
    """{kernel: (launches, milliseconds)} per call of `call`, most time first, over
    `repeats` profiled calls after one unprofiled."""
    call()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as run:
        for _ in range(repeats):
            call()
        if cuda:
            torch.cuda.synchronize()
    times = {
        event.key: (
            event.count / repeats,
            (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000 / repeats,
        )
        for event in run.key_averages()
        if event.device_type == kind
    }
    return dict(sorted(times.items(), key=lambda item: -item[1][1]))


class LayerTimer:
    """Times every wrapped layer of a UNet call with hooks around it (CUDA events on GPU)."""

    def __init__(self, layers: list, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.open: dict[str, object] = {}
        self.spans: dict[str, list] = defaultdict(list)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._start))
            self.handles.append(layer.register_forward_hook(self._end))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, layer, args) -> None:
        self.open[layer.name] = self._mark()

    def _end(self, layer, args, out) -> None:
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        self.shapes[layer.name] = tuple(out.shape[-2:])
        self.spans[layer.name].append((self.open.pop(layer.name), self._mark()))

    def collect(self) -> dict[str, float]:
        """Median milliseconds per layer since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
        medians = {
            name: statistics.median(self._elapsed_ms(a, b) for a, b in spans)
            for name, spans in self.spans.items()
        }
        self.spans.clear()
        return medians

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def square_mask(side: int, ratio: float) -> torch.Tensor:
    """A centred square covering about `ratio` of a side x side latent, aligned to the
    engine's 2x2 blocks so that the recomputed region is the square itself."""
    width = max(2, 2 * round(math.sqrt(ratio) * side / 2))
    start = 2 * ((side - width) // 4)
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[start : start + width, start : start + width] = True
    return mask


def irregular_mask(side: int, ratio: float) -> torch.Tensor:
    """Two overlapping off-centre ellipses, scaled to cover about `ratio` of the latent."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    y, x = y.float() / side, x.float() / side

    def blob(scale: float) -> torch.Tensor:
        first = ((x - 0.4) / (0.30 * scale)) ** 2 + ((y - 0.45) / (0.18 * scale)) ** 2 <= 1
        second = ((x - 0.62) / (0.12 * scale)) ** 2 + ((y - 0.62) / (0.25 * scale)) ** 2 <= 1
        return first | second

    low, high = 0.01, 4.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if blob(middle).float().mean() < ratio else (low, middle)
    return blob(high)


class Clock:
    """Repeated wall time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.end_to_end_repeats = 1 if self.cuda else CPU_END_TO_END_REPEATS

    def ms(self, fn: Callable[[], object], repeats: int = 10, warmup: int = 3) -> Timing:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1000)
        return Timing.of(times)


def _model(name: str, device: str, dtype: torch.dtype, workdir: str) -> DiffusionModel:
    if name == "tiny":
        return load_model(build_tiny_model(Path(workdir) / "tiny"), device, dtype)
    return UNET_SHAPES[name].build_model(device, dtype)


def _pipeline(model: DiffusionModel):
    scheduler = DPMSolverMultistepScheduler.from_config(
        model.scheduler_config, algorithm_type="dpmsolver++"
    )
    parts = dict(vae=model.vae, unet=model.unet, scheduler=scheduler)
    if model.is_sdxl:
        encoders = dict(zip(("text_encoder", "text_encoder_2"), model.text_encoders, strict=True))
        tokenizers = dict(zip(("tokenizer", "tokenizer_2"), model.tokenizers, strict=True))
        return StableDiffusionXLPipeline(**parts, **encoders, **tokenizers)
    return StableDiffusionPipeline(
        **parts,
        text_encoder=model.text_encoders[0],
        tokenizer=model.tokenizers[0],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class ModelBench:
    """All measurements of one model shape."""

    def __init__(self, name: str, model: DiffusionModel, steps: int, clock: Clock) -> None:
        self.name, self.model, self.steps, self.clock = name, model, steps, clock
        device, dtype = model.device, model.dtype
        side = model.latent_shape[1]
        self.sample = torch.randn(2, 4, side, side, device=device, dtype=dtype)
        self.embeds = model.encode_for_guidance(PROMPT)
        self.added = model.added_conditions(self.embeds)
        self.timestep = torch.tensor(500.0, device=device)

    def text(self, engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
        """The text embeddings and their keys and values, computed once as a run does."""
        return self.embeds.hidden, engine.text_keys_values(self.embeds)

    def time_projections(self, engine: Engine) -> torch.Tensor | None:
        """The resnets' time projections at the step's timestep, computed before the step
        as a run does."""
        projections = engine.time_projections(self.timestep[None], self.added)
        return None if projections is None else projections[0]

    def per_run(
        self, engine: Engine
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """What a run computes once, before its steps, for `Engine.unet_pass`."""
        return self.text(engine), self.time_projections(engine)

    def unet_call(self, unet) -> Callable[[], object]:
        def call():
            with torch.no_grad():
                return unet(
                    self.sample,
                    self.timestep,
                    encoder_hidden_states=self.embeds.hidden,
                    added_cond_kwargs=self.added,
                )

        return call

    def sparse_call(self, engine: Engine, base: EditSession, mask: torch.Tensor):
        """One sparse UNet step over `mask` as the engine's edits run it: replayed from a
        CUDA graph where the engine captures graphs, recording the new version's state."""
        device, step, cache = engine.model.device, self.steps // 2, base.current.cache
        plan = SparsePlan(mask.to(device), engine.config.sparse, device)
        record = ActivationCache(self.steps, channels_last=engine.config.channels_last)
        reads = engine.sparse_reads(plan, cache)
        per_run = self.per_run(engine)
        if engine.graphs:
            # Captured for (and kept by) the new cache it records into, as an edit's step is.
            graph = engine.step_graphs.sparse_step(self.sample[:1].shape, plan, record)
            args = (self.sample, self.timestep, step, self.embeds, self.added, record)
            return lambda: graph(*args, MacCount(), cache, reads, per_run[1])

        def call():
            maps = engine.step_maps(record, cache, step, reads)
            with engine.unet_pass(step, MacCount(), plan, cache, maps, *per_run):
                return self.unet_call(engine.model.unet)()

        return call

    @contextmanager
    def eager_sparse_steps(
        self, engine: Engine, base: EditSession, mask: torch.Tensor
    ) -> Iterator[SparsePlan]:
        """Inside, a call of the engine's UNet is an eager sparse step over `mask` (its plan
        is yielded), as an edit of `base` runs it, recording into a new cache."""
        device, step, cache = engine.model.device, self.steps // 2, base.current.cache
        plan = SparsePlan(mask.to(device), engine.config.sparse, device)
        record = ActivationCache(self.steps, channels_last=engine.config.channels_last)
        maps = engine.step_maps(record, cache, step, engine.sparse_reads(plan, cache))
        with engine.unet_pass(step, MacCount(), plan, cache, maps, *self.per_run(engine)):
            yield plan

    @contextmanager
    def eager_dense_steps(self, engine: Engine) -> Iterator[None]:
        """Inside, a call of the engine's UNet is an eager dense step as a run takes it."""
        step = self.steps // 2
        with engine.unet_pass(step, MacCount(), None, None, None, *self.per_run(engine)):
            yield

    def profile_layers(
        self, engine: Engine, base: EditSession, mask: torch.Tensor, repeats: int
    ) -> list[LayerProfile]:
        """Per-layer time of an eager dense step and an eager sparse step over `mask`."""
        call = self.unet_call(engine.model.unet)
        timer = LayerTimer(engine.layers, engine.model.device)
        try:
            with self.eager_dense_steps(engine):
                call()
                timer.collect()
                for _ in range(repeats):
                    call()
            dense = timer.collect()
            with self.eager_sparse_steps(engine, base, mask) as plan:
                call()
                timer.collect()
                for _ in range(repeats):
                    call()
            sparse = timer.collect()
        finally:
            timer.remove()
        return [
            LayerProfile(
                model=self.name,
                layer=layer.name,
                kind=type(layer).__name__,
                resolution=timer.shapes[layer.name],
                active_fraction=_active_fraction(plan, timer.shapes[layer.name]),
                dense_ms=dense[layer.name],
                sparse_ms=sparse[layer.name],
            )
            for layer in engine.layers
        ]

    def profile_kernels(
        self,
        engine: Engine,
        base: EditSession,
        mask: torch.Tensor,
        repeats: int,
        method: str = "fisedit",
        steps: tuple[str, ...] = ("dense", "sparse"),
    ) -> list[KernelTime]:
        """Each kernel's time in an eager dense step and an eager sparse step over `mask`
        (those of `steps`): where a step's time goes, beside what
        `fisedit.bench.step_launches` counts."""
        call, cuda = self.unet_call(engine.model.unet), engine.model.device.type == "cuda"
        eager = {
            "dense": lambda: self.eager_dense_steps(engine),
            "sparse": lambda: self.eager_sparse_steps(engine, base, mask),
        }
        kernels = []
        for step in steps:
            with eager[step]():
                times = kernel_times(call, repeats, cuda)
            kernels += [
                KernelTime(
                    model=self.name, step=step, kernel=kernel, method=method, calls=calls, ms=ms
                )
                for kernel, (calls, ms) in times.items()
            ]
        return kernels

    def dense(self, method: str, unet, repeats: int) -> BenchRun:
        pipeline = _pipeline(self.model)
        pipeline.unet = unet
        pipeline.set_progress_bar_config(disable=True)

        def generate():
            with torch.no_grad():
                pipeline(PROMPT, num_inference_steps=self.steps, output_type="np")

        step = self.clock.ms(self.unet_call(unet), repeats=repeats)
        # The warm-up run is where compilation and graph capture happen.
        end_to_end = self.clock.ms(generate, self.clock.end_to_end_repeats, warmup=1)
        spread = {"dense_step": step.spread, "end_to_end": end_to_end.spread}
        return BenchRun(
            model=self.name,
            method=method,
            mask=None,
            mask_ratio=1.0,
            k=0,
            dense_step_ms=step.median_ms,
            sparse_step_ms=None,
            end_to_end_ms=end_to_end.median_ms,
            mac_fraction=1.0,
            peak_memory_bytes=_peak_memory(self.model.device),
            spread=spread,
            noisy=_is_noisy(spread),
        )

    def fisedit(
        self,
        engine: Engine,
        base: EditSession,
        mask_name: str,
        mask: torch.Tensor,
        k: int,
        dense_step: Timing,
        repeats: int,
        method: str = "fisedit",
    ) -> BenchRun:
        """FISEdit's edits over `mask` after k dense steps, compared with `dense_step`.

        Edits are timed as a session's user makes them, one after another: each records in
        place into the version it edits and (on a GPU) replays the sparse step that the
        session's first edit captured. Like the dense baselines, they are timed after a
        warm-up: that first edit, which also compiles what this mask needs."""
        device = engine.model.device
        # A session of its own, with a copy of `base`'s cache: later cases start from base too.
        session = EditSession(
            engine, base.params, replace(base.current, cache=base.current.cache.to(device))
        )
        prompts = itertools.cycle((EDIT, PROMPT))  # every edit changes the text
        first = session.edit(next(prompts), mask, mask_steps=k).report
        _reset_peak_memory(device)
        edits = range(self.clock.end_to_end_repeats)
        reports = [session.edit(next(prompts), mask, mask_steps=k).report for _ in edits]
        del session  # frees its cache before the sparse step below records into a new one
        report = reports[-1]
        end_to_end = Timing.of([r.total_latency_s * 1000 for r in reports])
        sparse = self.clock.ms(self.sparse_call(engine, base, mask), repeats=repeats)
        fraction = report.sparse_step_mac_fraction
        spread = {
            "dense_step": dense_step.spread,
            "sparse_step": sparse.spread,
            "end_to_end": end_to_end.spread,
        }
        return BenchRun(
            model=self.name,
            method=method,
            mask=mask_name,
            mask_ratio=report.mask_ratio,
            k=k,
            dense_step_ms=dense_step.median_ms,
            sparse_step_ms=sparse.median_ms,
            end_to_end_ms=end_to_end.median_ms,
            mac_fraction=report.mac_fraction,
            sparse_step_mac_fraction=fraction,
            sparse_step_efficiency=dense_step.median_ms * fraction / sparse.median_ms,
            cache_bytes=report.cache_bytes,
            peak_memory_bytes=_peak_memory(engine.model.device),
            first_edit_ms=first.total_latency_s * 1000,
            graph_capture_ms=first.graph_capture_s * 1000,
            spread=spread,
            noisy=_is_noisy(spread),
        )


def _active_fraction(plan: SparsePlan, hw: tuple[int, int]) -> float:
    geometry = plan.at(hw)
    return geometry.index.numel() / geometry.pixels


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@dataclass
class BenchResults:
    """What a benchmark has measured so far, written out (JSON and PNG) after every case, so
    that a run stopped part-way (at a device's time limit, say) keeps what it measured."""

    device: str
    out: Path
    meta: dict
    runs: list[BenchRun] = field(default_factory=list)
    layers: list[LayerProfile] = field(default_factory=list)
    kernels: list[KernelTime] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    """Measurements that failed (see `_attempt`)."""

    def add(
        self,
        runs: list[BenchRun],
        layers: list[LayerProfile] | None = None,
        kernels: list[KernelTime] | None = None,
    ) -> list[BenchRun]:
        """Records finished cases and profiles, writes everything, then prints the cases and
        the sparse step's costliest kernels; returns the cases."""
        self.runs += runs
        self.layers += layers or []
        self.kernels += kernels or []
        self.write()
        for run in runs:
            print(table_row(run), flush=True)
        for line in kernel_table(kernels or []):
            print(line, flush=True)
        return runs

    def write(self) -> Path:
        """Writes <device>-<date>.json and .png under `out`; returns the JSON path."""
        meta = {**self.meta, "errors": self.errors}
        profiles = {"layers": self.layers, "kernels": self.kernels}
        return write_results(self.runs, profiles, self.device, self.out, meta)


def bench_model(
    name: str,
    device: str,
    dtype: torch.dtype,
    steps: int,
    compile: bool,
    repeats: int,
    engine_config: EngineConfig,
    results: BenchResults,
    compare: tuple[SparseConfig, ...] = (),
) -> None:
    """Dense eager, dense compiled (optional) and FISEdit runs for one model shape, and a
    per-layer profile of a dense and a sparse step at a 15% mask, each added to `results`
    as it finishes; then FISEdit's edit at that mask under each sparse config of `compare`,
    with its sparse step's kernel profile.
    A measurement that fails is recorded as an error and the others go on."""
    with tempfile.TemporaryDirectory() as workdir:
        model = _model(name, device, dtype, workdir)
    clock = Clock(model.device)
    bench = ModelBench(name, model, steps, clock)
    errors = results.errors
    print(TABLE_HEADER, flush=True)
    _reset_peak_memory(model.device)
    dense = results.add([bench.dense("dense-eager", model.unet, repeats)])
    if compile:
        _reset_peak_memory(model.device)
        compiled = torch.compile(model.unet, mode="reduce-overhead")
        dense += results.add(
            _attempt(
                errors, f"{name} dense-compiled", bench.dense, "dense-compiled", compiled, repeats
            )
        )
        # Frees the compiled graphs' memory pool before FISEdit's cases.
        del compiled
        torch._dynamo.reset()
    best = min(dense, key=lambda run: run.dense_step_ms)
    dense_step = Timing(best.dense_step_ms, best.spread["dense_step"])
    config = engine_config.model_copy(
        update={"device": device, "dtype": _dtype_name(dtype), "progress": False}
    )
    engine = Engine(model, config)
    base = engine.generate(PROMPT, steps=steps, seed=0)
    side = model.latent_shape[1]
    cases = [(f"square-{round(r * 100)}", square_mask(side, r), 0) for r in MASK_RATIOS]
    cases.append(("irregular-15", irregular_mask(side, 0.15), 0))
    cases += [("square-15", square_mask(side, 0.15), k) for k in (3, 10) if k < steps]
    for mask_name, mask, k in cases:
        what = f"{name} fisedit {mask_name} k={k}"
        results.add(
            _attempt(
                errors, what, bench.fisedit, engine, base, mask_name, mask, k, dense_step, repeats
            )
        )
    mask = square_mask(side, 0.15)
    layers = _attempt(
        errors, f"{name} layer profile", bench.profile_layers, engine, base, mask, repeats
    )
    kernels = _attempt(
        errors, f"{name} kernel profile", bench.profile_kernels, engine, base, mask, repeats
    )
    results.add([], [p for ps in layers for p in ps], [k for ks in kernels for k in ks])
    del engine, base, bench, model  # frees their caches for the compared configs'
    for sparse in compare:
        method = _compared_method(config.sparse, sparse)
        compared = config.model_copy(update={"sparse": sparse})
        args = (name, dtype, steps, clock, compared, method, dense_step, repeats, results)
        _attempt(errors, f"{name} {method}", _compared_edit, *args)


def _compared_method(main: SparseConfig, compared: SparseConfig) -> str:
    """A compared config's method name: fisedit and its options that differ from `main`."""
    changed = compared.model_dump().items() - main.model_dump().items()
    return " ".join(["fisedit", *(f"{key}={value}" for key, value in sorted(changed))])


def _compared_edit(
    name: str,
    dtype: torch.dtype,
    steps: int,
    clock: Clock,
    config: EngineConfig,
    method: str,
    dense_step: Timing,
    repeats: int,
    results: BenchResults,
) -> None:
    """FISEdit's edit over a 15% square mask under `config`, on a model of its own (an engine
    wraps its model's layers in place) built like the first, against its `dense_step`; then
    its sparse step's kernel profile, which says where a difference in time comes from (a
    kernel only that config runs, say). Each is added to `results` as it finishes."""
    with tempfile.TemporaryDirectory() as workdir:
        model = _model(name, config.device, dtype, workdir)
    engine = Engine(model, config)
    base = engine.generate(PROMPT, steps=steps, seed=0)
    mask = square_mask(model.latent_shape[1], 0.15)
    bench = ModelBench(name, model, steps, clock)
    results.add([bench.fisedit(engine, base, "square-15", mask, 0, dense_step, repeats, method)])
    what = f"{name} {method} kernel profile"
    args = (engine, base, mask, repeats, method, ("sparse",))
    kernels = _attempt(results.errors, what, bench.profile_kernels, *args)
    results.add([], kernels=[k for ks in kernels for k in ks])


def _attempt(errors: list[dict], what: str, measure: Callable, *args) -> list:
    """[measure(*args)], or [] with the failure printed and added to `errors`: a benchmark
    keeps what it did measure (an out-of-memory SDXL must not lose SD 1.5)."""
    try:
        return [measure(*args)]
    except Exception as error:
        traceback.print_exc()
        errors.append({"what": what, "error": f"{type(error).__name__}: {error}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return []


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def write_results(
    runs: list[BenchRun], profiles: dict[str, list], device: str, out: Path, meta: dict
) -> Path:
    """Writes <device>-<date>.json and .png under `out`, each replacing the last in one step
    (a reader never sees half a file); returns the JSON path. `profiles` holds the layer
    and kernel profiles by name. The date is `meta`'s, the day the run started: a run that
    goes past midnight keeps writing the same files."""
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = out / f"{slug}-{meta['date']}"
    payload = {
        "device": name,
        **meta,
        "runs": [run.model_dump() for run in runs],
        **{name: [entry.model_dump() for entry in entries] for name, entries in profiles.items()},
    }
    partial = stem.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=2))
    partial.replace(stem.with_suffix(".json"))
    plot(runs, stem.with_suffix(".png"), title=f"FISEdit edit speedup on {name}")
    return stem.with_suffix(".json")


def plot(runs: list[BenchRun], path: Path, title: str) -> None:
    """End-to-end speedup against mask ratio for supplied-mask edits, with the MAC limit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(run.model for run in runs):
        mine = [r for r in runs if r.model == model]
        dense = {r.method: r.end_to_end_ms for r in mine if r.mask is None}
        squares = (
            r
            for r in mine
            if r.method == "fisedit" and r.k == 0 and (r.mask or "").startswith("square")
        )
        edits = sorted(squares, key=lambda r: r.mask_ratio)
        ratios = [r.mask_ratio for r in edits]
        for method, style in (("dense-eager", "o-"), ("dense-compiled", "s--")):
            if method in dense:
                speedup = [dense[method] / r.end_to_end_ms for r in edits]
                axes.plot(ratios, speedup, style, label=f"{model} vs {method}")
        axes.plot(ratios, [1 / r.mac_fraction for r in edits], ":", label=f"{model} MAC limit")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set(xlabel="mask ratio", ylabel="end-to-end speedup (supplied mask)", title=title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, dpi=120, format="png")
    pyplot.close(figure)
    partial.replace(path)


TABLE_HEADER = (
    "model       mask          k  dense step ms    sparse step ms  end-to-end ms     MACs"
    "   eff  method"
)


def table_row(run: BenchRun) -> str:
    """One case: each time as median ± spread, and NOISY where comparisons are meaningless.
    The method comes last: a compared config's name is as long as its changed options."""

    def timing(ms: float | None, spread_key: str, width: int) -> str:
        if ms is None:
            return " " * (width + 6)
        return f"{ms:{width}.1f} ±{run.spread.get(spread_key, 0.0):4.0%}"

    eff = f"{run.sparse_step_efficiency:5.2f}" if run.sparse_step_efficiency else " " * 5
    return (
        f"{run.model:11} {run.mask or '-':12} {run.k:2} "
        f"{timing(run.dense_step_ms, 'dense_step', 9)}  "
        f"{timing(run.sparse_step_ms, 'sparse_step', 9)}  "
        f"{timing(run.end_to_end_ms, 'end_to_end', 9)}  "
        f"{run.mac_fraction:5.2f} {eff}  {run.method}" + ("  NOISY" if run.noisy else "")
    )


def kernel_table(kernels: list[KernelTime], top: int = 10) -> list[str]:
    """Each model's costliest kernels in its sparse step (and in each compared config's):
    milliseconds and share of the step's profiled time, and launches, per step."""
    lines = []
    for model, method in dict.fromkeys((k.model, k.method) for k in kernels):
        sparse = [k for k in kernels if (k.model, k.method, k.step) == (model, method, "sparse")]
        total = sum(k.ms for k in sparse)
        step = f"the {model} sparse step" + ("" if method == "fisedit" else f" ({method})")
        if not total:
            lines.append(f"kernels of {step}: the profiler recorded none")
            continue
        lines.append(f"costliest kernels of {step} ({total:.2f} ms profiled):")
        lines += [
            f"  {k.ms:9.3f} ms {k.ms / total:4.0%} {k.calls:6g}x  {k.kernel[:90]}"
            for k in sparse[:top]
        ]
    return lines


def run_benchmark(
    device: str = "cuda",
    models: tuple[str, ...] = MODELS,
    dtype: torch.dtype | None = None,
    steps: int = 50,
    compile: bool | None = None,
    repeats: int = 10,
    out: Path = Path("bench/results"),
    engine_config: EngineConfig | None = None,
    compare: tuple[SparseConfig, ...] = (),
) -> Path:
    """Runs every model and writes the results after each case; returns the JSON path.

    `engine_config` sets FISEdit's sparse config, layout and graphs (device and dtype come
    from the arguments); each sparse config of `compare` times FISEdit's edit at a 15%
    square mask once more, side by side in the same process (method "fisedit" and the
    options that differ). Failures are recorded under "errors" in the JSON."""
    engine_config = engine_config or EngineConfig()
    on_gpu = torch.device(device).type == "cuda"
    dtype = dtype or (torch.float16 if on_gpu else torch.float32)
    compile = on_gpu if compile is None else compile
    meta = {"date": datetime.date.today().isoformat(), "dtype": _dtype_name(dtype), "steps": steps}
    meta.update(
        torch=torch.__version__,
        sparse=engine_config.sparse.model_dump(),
        compared=[config.model_dump() for config in compare],
        channels_last=engine_config.channels_last,
        cuda_graphs=engine_config.cuda_graphs,
    )
    results = BenchResults(device, out, meta)
    for name in models:
        args = (name, device, dtype, steps, compile, repeats, engine_config, results, compare)
        _attempt(results.errors, name, bench_model, *args)
    path = results.write()
    noisy = sum(run.noisy for run in results.runs)
    if noisy:
        print(
            f"{noisy} of {len(results.runs)} cases are NOISY: a timing varied by more than "
            f"{NOISY_SPREAD:.0%} of its median between repeats, so their comparisons are not "
            "meaningful; rerun them on a quiet machine"
        )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path
