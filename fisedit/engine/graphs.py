"""UNet calls captured once as CUDA graphs and replayed every step.

Every shape in a denoise step is static: the latents and prompt embeddings, and for sparse
steps the mask, hence every index tensor. A captured step owns static input buffers that
each call fills before replaying. What the UNet records goes to static slots (one step of a
cache) and is copied into the run's cache at the step's index after each replay, so a graph
does not belong to a run: the engine captures its dense step once and replays it for
generations and for every edit's capture steps.

A sparse step reads a version's cache at a step index held in device memory, and its plan's
index tensors. Plans pad their active pixels to buckets, so edits with similar masks have
plans of one signature (`SparsePlan.signature`), differing only in index values: a sparse
step is captured once per signature and source cache, and a later edit over such a plan
reading the same cache (another edit of the same version) loads its indices into the
captured plan and replays. Nothing in a replay depends on Python state, and no host sync
happens in the loop.

All captures share one memory pool and, per latent shape, one set of slots: replays run one
at a time, and what a replay writes (its output, the slots) is read before the next one.

On a CPU nothing is captured: the same static buffers and plans run eagerly, so tests can
check this path without a GPU.
"""

import time
import weakref

import torch

from fisedit.engine.cache import ActivationCache, HostPrefetcher, StepSlots
from fisedit.engine.layers import MacCount
from fisedit.engine.models import PromptEmbeddings
from fisedit.engine.plan import SparsePlan


class CapturedUNetStep:
    """Runs UNet calls, dense or sparse over one plan, by replaying one CUDA graph."""

    def __init__(self, engine, slots: StepSlots, plan: SparsePlan | None = None, pool=None) -> None:
        self.engine, self.slots, self.plan, self.pool = engine, slots, plan, pool
        self.loaded = plan
        """The plan whose indices the captured plan's tensors hold."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.step_macs = MacCount()
        self.capture_s = 0.0
        """Seconds spent on the warm-up call and the capture."""

    @property
    def captured(self) -> bool:
        return self.output is not None

    def load(self, plan: SparsePlan) -> None:
        """Makes the next calls compute over `plan`, which has the captured plan's signature."""
        if plan is not self.loaded:
            self.plan.load_(plan)
            self.loaded = plan

    def _call(self, macs: MacCount, source: ActivationCache | None) -> torch.Tensor:
        with self.engine.unet_pass(self.step, macs, self.plan, source, self.slots):
            return self.engine.model.unet(
                self.sample,
                self.timestep,
                encoder_hidden_states=self.hidden,
                added_cond_kwargs=self.added,
            ).sample

    def _load(self, sample, timestep, step: int, embeds: PromptEmbeddings, added) -> None:
        """Fills the static input buffers with this call's inputs (the first call makes them)."""
        inputs = {
            "sample": sample,
            "timestep": timestep,
            "hidden": embeds.hidden,
        }
        inputs.update({f"added.{k}": v for k, v in (added or {}).items()})
        if self.captured:
            for name, value in inputs.items():
                self.inputs[name].copy_(value)
            self.step.fill_(step)
            return
        self.inputs = {name: value.clone() for name, value in inputs.items()}
        self.sample, self.timestep = self.inputs["sample"], self.inputs["timestep"]
        self.hidden = self.inputs["hidden"]
        self.added = {k: self.inputs[f"added.{k}"] for k in added} if added else None
        self.step = torch.tensor(step, device=sample.device)

    def _capture(self, source: ActivationCache | None) -> None:
        device = self.sample.device
        if device.type != "cuda":
            self.output = self._call(self.step_macs, source)
            return
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # Warm-up: builds the plan's indices, packs weights, allocates slots, compiles
            # kernels and counts MACs; every later call replays, so one call is enough.
            self._call(self.step_macs, source)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = self._call(MacCount(), source)
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    @torch.no_grad()
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        step: int,
        embeds: PromptEmbeddings,
        added: dict | None,
        record: ActivationCache | None,
        macs: MacCount,
        source: ActivationCache | None = None,
    ) -> torch.Tensor:
        """The UNet output for denoise step `step`, recorded into `record` at `step`; a
        sparse step reads `source`, the cache it was captured with.

        The output is a static buffer: the next call overwrites it."""
        first = not self.captured
        self._load(sample, timestep, step, embeds, added)
        if first:
            self._capture(source)
        if self.graph is not None:
            self.graph.replay()
        elif not first:
            self.output = self._call(MacCount(), source)
        if record is not None:
            record.put_step(step, self.slots.tensors)
        macs.add(self.step_macs.dense, self.step_macs.executed)
        return self.output


def _cache_key(cache: ActivationCache | HostPrefetcher) -> tuple:
    """The memory a step reading `cache` reads: a captured step replays on the same. A
    prefetcher serves every step from its own static buffers."""
    if isinstance(cache, HostPrefetcher):
        return ("prefetcher", id(cache))
    return tuple(
        (name, t.data_ptr(), t.dtype, t.shape, t.stride()) for name, t in cache.tensors.items()
    )


def _forget(graphs: "weakref.ref[StepGraphs]", key: tuple) -> None:
    if (alive := graphs()) is not None:
        alive.sparse.pop(key, None)


class StepGraphs:
    """An engine's captured UNet calls: the dense one per latent shape, and sparse ones per
    latent shape, plan signature and source cache (dropped with the cache)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.dense: dict[torch.Size, CapturedUNetStep] = {}
        self.sparse: dict[tuple, CapturedUNetStep] = {}
        self._slots: dict[torch.Size, StepSlots] = {}
        self.pool = None
        """The memory pool every capture allocates from (made by the first one on CUDA)."""

    def _new(self, shape: torch.Size, plan: SparsePlan | None) -> CapturedUNetStep:
        if shape not in self._slots:
            self._slots[shape] = StepSlots(self.engine.config.channels_last)
        if self.pool is None and self.engine.model.device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        return CapturedUNetStep(self.engine, self._slots[shape], plan, self.pool)

    def dense_step(self, shape: torch.Size) -> CapturedUNetStep:
        """The dense, recording UNet call for latents of `shape`."""
        if shape not in self.dense:
            self.dense[shape] = self._new(shape, None)
        return self.dense[shape]

    def sparse_step(
        self, shape: torch.Size, plan: SparsePlan, source: ActivationCache | HostPrefetcher
    ) -> CapturedUNetStep:
        """The sparse UNet call over `plan` reading `source`, for latents of `shape`: one
        captured for a plan of the same signature, with `plan`'s indices loaded, if any."""
        key = (shape, plan.signature, _cache_key(source))
        step = self.sparse.get(key)
        if step is None:
            step = self.sparse[key] = self._new(shape, plan)
            # The graph reads the cache's memory: it goes when the cache does.
            weakref.finalize(source, _forget, weakref.ref(self), key)
        step.load(plan)
        return step
