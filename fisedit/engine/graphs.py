"""UNet calls captured once as CUDA graphs and replayed every step.

Every shape in a denoise step is static: the latents and prompt embeddings, and for sparse
steps the mask, hence every index tensor. A captured step owns static input buffers that
each call fills before replaying (what a run passes at every step, its prompt embeddings
and their text keys and values, only when the run changes; the step's row of the run's
time projections at every step). What a
dense step records stays where the captured call made it, in the graph's memory (a map in
another layout than the cache's is copied into a static slot: `StepSlots`), and is copied
into the run's cache at the step's index after each replay, so the graph does not belong to
a run: the engine captures its dense step once and replays it for generations and for
every edit's capture steps.

A sparse step reads its plan's index tensors, and the maps it records (`StepMaps`) at a
step index held in device memory: each map starts as the previous version's at the step
(copied before the replay, unless the run records in the previous version's own memory),
and kernels write the region into it at the step index; the UNet's own ops get static maps
for the outputs of sparse layers, which the replay fills from the cache where those ops
read them (`StaticMapReads`). Its graph is therefore bound to the memory of the maps it
records into, not to the cache it reads, and lives with those maps
(`ActivationCache.graphs`): an edit that records in place into the cache an earlier edit
made (a session's next edit) replays that edit's graph, its new plan loaded into the
captured plan's index tensors. Plans pad their active pixels to buckets
(`SparsePlan.signature`), so a similar mask compiles nothing and captures nothing.
Nothing in a replay depends on Python state, and no host sync happens in the loop.

All captures share one memory pool: replays run one at a time, and what a replay writes
(its output, what it records) is read before the next one; what a dense step records is
held, so no later capture allocates its memory.

On a CPU nothing is captured: the same static buffers and plans run eagerly, so tests can
check this path without a GPU.
"""

import time

import torch

from fisedit.engine.cache import ActivationCache, HostPrefetcher, StepMaps, StepSlots
from fisedit.engine.layers import MacCount
from fisedit.engine.models import PromptEmbeddings
from fisedit.engine.plan import SparsePlan


class CapturedUNetStep:
    """Runs UNet calls, dense or sparse over one plan, by replaying one CUDA graph."""

    def __init__(self, engine, slots: StepSlots, plan: SparsePlan | None = None, pool=None) -> None:
        self.engine, self.slots, self.plan, self.pool = engine, slots, plan, pool
        """`slots`: where a dense step records."""
        self.maps: StepMaps | None = None
        """Where a sparse step records (made by its first call)."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.step_macs = MacCount()
        self.capture_s = 0.0
        """Seconds spent on the warm-up call and the capture."""

    @property
    def captured(self) -> bool:
        return self.output is not None

    def retarget(self, plan: SparsePlan) -> None:
        """Makes this sparse step replay over `plan` (of the captured plan's signature)."""
        if plan is not self.plan:
            self.plan.load(plan)

    def _call(self, macs: MacCount, source) -> torch.Tensor:
        record = self.slots if self.maps is None else self.maps
        text = (self.hidden, self.inputs["text"])
        projections = self.inputs.get("time_projections")
        with self.engine.unet_pass(self.step, macs, self.plan, source, record, text, projections):
            out = self.engine.model.unet(
                self.sample,
                self.timestep,
                encoder_hidden_states=self.hidden,
                added_cond_kwargs=self.added,
            ).sample
            # The output head's static map, which only the denoise loop reads.
            return out if self.maps is None else self.maps.filled(out)

    def _load(
        self,
        sample,
        timestep,
        step: int,
        embeds: PromptEmbeddings,
        added,
        record,
        source,
        reads,
        time_projections,
    ) -> None:
        """Fills the static input buffers with this call's inputs (the first call makes them),
        and a sparse step's maps with the previous version's."""
        inputs = {
            "sample": sample,
            "timestep": timestep,
            "hidden": embeds.hidden,
            "text": self.engine.text_keys_values(embeds),
        }
        inputs.update({f"added.{k}": v for k, v in (added or {}).items()})
        if time_projections is not None:
            inputs["time_projections"] = time_projections
        if self.captured:
            for name, value in inputs.items():
                # What a run passes at every step (its embeddings) is copied in once.
                if value is not self.loaded[name]:
                    self.inputs[name].copy_(value)
            self.step.fill_(step)
        else:
            self.inputs = {name: value.clone() for name, value in inputs.items()}
            self.sample, self.timestep = self.inputs["sample"], self.inputs["timestep"]
            self.hidden = self.inputs["hidden"]
            self.added = {k: self.inputs[f"added.{k}"] for k in added} if added else None
            self.step = torch.tensor(step, device=sample.device)
            if self.plan is not None:
                self.maps = StepMaps(record, source, self.step, reads)
        self.loaded = inputs
        """This call's inputs: held, so that their ids are not reused while compared."""
        if self.maps is not None:
            self.maps.fill(source, step)

    def _capture(self, source) -> None:
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
        source: "ActivationCache | HostPrefetcher | None" = None,
        reads: frozenset[str] = frozenset(),
        time_projections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet output for denoise step `step`, recorded into `record` at `step` (a
        sparse step always into the maps of its first call's record), a sparse step reading
        `source` outside its region (the maps `reads`, Engine.sparse_reads, as of its first
        call); its resnets take `time_projections` (the step's row of the run's) when
        given.

        The output is a static buffer: the next call overwrites it."""
        first = not self.captured
        self._load(sample, timestep, step, embeds, added, record, source, reads, time_projections)
        if first:
            self._capture(source)
        if self.graph is not None:
            self.graph.replay()
        elif not first:
            self.output = self._call(MacCount(), source)
        if self.maps is None and record is not None:
            record.put_step(step, self.slots.tensors)
        macs.add(self.step_macs.dense, self.step_macs.executed)
        return self.output


class StepGraphs:
    """An engine's captured UNet calls: it keeps the dense one per latent shape, and makes
    sparse ones (the maps they record into keep them); all allocate from one memory pool."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.dense: dict[torch.Size, CapturedUNetStep] = {}
        self._slots: dict[torch.Size, StepSlots] = {}
        self.pool = None
        """The memory pool every capture allocates from (made by the first one on CUDA)."""

    def _new(self, shape: torch.Size, plan: SparsePlan | None = None) -> CapturedUNetStep:
        if shape not in self._slots:
            self._slots[shape] = StepSlots(self.engine.config.channels_last)
        if self.pool is None and self.engine.model.device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        return CapturedUNetStep(self.engine, self._slots[shape], plan, self.pool)

    def dense_step(self, shape: torch.Size) -> CapturedUNetStep:
        """The dense, recording UNet call for latents of `shape`."""
        if shape not in self.dense:
            self.dense[shape] = self._new(shape)
        return self.dense[shape]

    def sparse_step(self, shape: torch.Size, plan: SparsePlan, record: ActivationCache):
        """The sparse UNet call over `plan` that records into `record`'s maps, for latents
        of `shape`: one captured for maps in that memory and a plan of that signature (then
        retargeted to `plan`), else a new one that the maps keep."""
        step = record.graphs.get(plan.signature)
        if step is None:
            step = record.graphs[plan.signature] = self._new(shape, plan)
        step.retarget(plan)
        return step
