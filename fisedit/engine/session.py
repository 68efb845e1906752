"""The engine: generate an image while recording its per-step state, then edit it sparsely.

An edit runs k dense steps with the new prompt from the same seed noise, finds the region
that changed (Target Area Capture) or takes a user mask, then recomputes only that region
in the remaining steps and reads everything else from the previous version's cache.
"""

import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image
from pydantic import BaseModel
from tqdm.auto import tqdm

from fisedit.engine.cache import ActivationCache, HostPrefetcher, StepMaps, StepSlots
from fisedit.engine.config import EditParams, EngineConfig, GenerationParams, SchedulerName
from fisedit.engine.graphs import CapturedUNetStep, StepGraphs
from fisedit.engine.images import blend_weight, preserve_background
from fisedit.engine.layers import MacCount, StepState, sparse_reads, time_embeddings, wrap_unet
from fisedit.engine.masks import latent_difference, load_mask, target_area_capture
from fisedit.engine.models import DiffusionModel, PromptEmbeddings, load_model
from fisedit.engine.plan import SparsePlan

if TYPE_CHECKING:  # the storage package imports boto3, which the engine needs only for S3
    from fisedit.storage import ObjectStore

SCHEDULERS: dict[SchedulerName, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_scheduler(name: SchedulerName, config: dict):
    """A fresh deterministic diffusers scheduler built from the model's scheduler config."""
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(config, **overrides)


def default_scheduler(config: dict) -> SchedulerName:
    """The checkpoint's own scheduler where the engine supports it, else DPM-Solver++."""
    own = config.get("_class_name")
    return next((name for name, (cls, _) in SCHEDULERS.items() if cls.__name__ == own), "dpm++")


ReferenceMode = Literal["steps", "layers"]
"""How `reference_edit` computes a sparse edit's reference: dense steps with the previous
latents pasted outside the mask, or dense layers with the cached maps pasted outside their
regions."""


StepCallback = Callable[[int, int], None]
"""Called after every denoise step of a generation or an edit with the steps done so far
and the steps in all (progress for a caller; it runs on the engine's thread)."""


class UnknownVersionError(ValueError):
    """A session has no version with this number."""


class NoChangeWarning(UserWarning):
    """An edit's prompt encodes to the current version's text embeddings: the edit would
    reproduce the current version, so it returns that version and makes no new one."""


class UneditableSessionWarning(UserWarning):
    """A generation's settings leave its edits no sparse steps: edits without a mask fail."""


class EditReport(BaseModel):
    """What one generation or edit cost and what it changed."""

    version: int
    base_version: int | None
    prompt: str
    mask_source: Literal["none", "capture", "user"]
    mask_ratio: float
    """Fraction of the latent the captured or supplied mask covers."""
    region_ratio: float
    """Fraction the sparse steps recompute: the mask grown to whole blocks."""
    changed_pixel_ratio: float
    """Fraction of image pixels that may differ from the previous version: the recomputed
    region and the blended seam around it (every pixel without background preservation)."""
    dense_steps: int
    sparse_steps: int
    dense_macs: int
    executed_macs: int
    mac_fraction: float
    sparse_step_mac_fraction: float | None
    latency_s: dict[str, float]
    total_latency_s: float
    truncated_prompt: str | None = None
    """The part of a prompt longer than the text encoder takes that it read; None if it fit."""
    graph_capture_s: float = 0.0
    """Part of the latency spent capturing CUDA graphs (each with one eager warm-up call)."""
    host_bytes: int = 0
    """Bytes copied from a host-resident cache to the device (0 when it was on the device)."""
    cache_bytes: int


@dataclass
class Version:
    """One version of a session: its image, and the recorded state the next edit reuses."""

    number: int
    prompt: str
    image: np.ndarray
    cache: ActivationCache | None
    report: EditReport
    mask: torch.Tensor | None = None
    """The latent region the edit recomputed (None for a generation)."""
    edit: EditParams | None = None
    """The request that made this version from the previous one."""
    user_mask: torch.Tensor | None = None
    """The mask the user supplied, if any, as given (before growing to blocks)."""

    @property
    def parent(self) -> int | None:
        """The version this one was edited from (None for the generation)."""
        return self.report.base_version

    @property
    def pil_image(self) -> Image.Image:
        return Image.fromarray(self.image)


class PhaseTimer:
    """Wall-clock seconds per named phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class DenoiseRun:
    """One pass over the timesteps from the seed noise, recording every step it runs."""

    def __init__(
        self,
        engine: "Engine",
        params: GenerationParams,
        embeds: PromptEmbeddings,
        on_step: StepCallback | None = None,
        record: ActivationCache | None = None,
    ):
        """`record`: where the run records (by default a new cache)."""
        model = engine.model
        self.engine, self.params, self.embeds, self.on_step = engine, params, embeds, on_step
        self.scheduler = make_scheduler(params.scheduler, model.scheduler_config)
        self.scheduler.set_timesteps(params.steps, device=model.device)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        shape = model.latent_shape_at(params.height, params.width)
        noise = torch.randn((1, *shape), generator=generator)
        self.latents = noise.to(model.device, model.dtype) * self.scheduler.init_noise_sigma
        self.record = record or ActivationCache(
            params.steps, channels_last=engine.config.channels_last
        )
        self.added = model.added_conditions(embeds, (params.height, params.width))
        self.capture_s = 0.0
        """Seconds this run spent capturing CUDA graphs."""
        self.sparse_graphs: dict[int, CapturedUNetStep] = {}
        """The captured sparse steps this run replays, by plan."""

    @torch.no_grad()
    def step(
        self,
        step: int,
        macs: MacCount,
        plan: SparsePlan | None = None,
        source=None,
        reads: frozenset[str] = frozenset(),
    ):
        """Runs `step`: dense, or sparse over `plan` reading `source` outside it (the maps
        `reads`, Engine.sparse_reads)."""
        scheduler = self.scheduler
        t = scheduler.timesteps[step]
        model_in = scheduler.scale_model_input(torch.cat([self.latents] * 2), t)
        # Always a float timestep: a graph's static buffer keeps the dtype of its first call,
        # and an integer one would truncate the fractional timesteps of a later Euler run.
        unet_t = torch.as_tensor(t, dtype=torch.float32, device=model_in.device)
        projections = None if self.time_projections is None else self.time_projections[step]
        graph = self._graph(plan)
        if graph is not None:
            captured = graph.captured
            args = (model_in, unet_t, step, self.embeds, self.added, self.record, macs)
            out = graph(*args, source, reads, projections)
            self.capture_s += 0.0 if captured else graph.capture_s
        else:
            engine, record = self.engine, self.record
            if plan is not None:
                record = engine.step_maps(self.record, source, step, reads)
            text = (self.embeds.hidden, engine.text_keys_values(self.embeds))
            with engine.unet_pass(step, macs, plan, source, record, text, projections):
                out = engine.model.unet(
                    model_in,
                    unet_t,
                    encoder_hidden_states=self.embeds.hidden,
                    added_cond_kwargs=self.added,
                ).sample
        uncond, cond = out.chunk(2)
        noise_pred = uncond + self.params.guidance * (cond - uncond)
        self.latents = scheduler.step(noise_pred, t, self.latents).prev_sample
        self.record.put("latents", step, self.latents)
        if self._history:
            self.record.put("solver_history", step, self._history[-1])
        if self.on_step is not None:
            self.on_step(step + 1, self.params.steps)

    @cached_property
    def time_projections(self) -> torch.Tensor | None:
        """What steps take for their resnets' time projections, for every step: computed by
        the first step, once."""
        return self.engine.time_projections(self.scheduler.timesteps, self.added)

    def _graph(self, plan: SparsePlan | None) -> CapturedUNetStep | None:
        """The engine's captured UNet call, dense or for `plan` recording into this run's
        maps; none unless the engine captures graphs."""
        engine, shape = self.engine, self.latents.shape
        if not engine.graphs:
            return None
        if plan is None:
            return engine.step_graphs.dense_step(shape)
        if id(plan) not in self.sparse_graphs:
            self.sparse_graphs[id(plan)] = engine.step_graphs.sparse_step(shape, plan, self.record)
        return self.sparse_graphs[id(plan)]

    @property
    def _history(self) -> list | None:
        # Multistep solvers keep earlier model outputs; they are state like the latents.
        return getattr(self.scheduler, "model_outputs", None)

    def reset_outside(
        self, mask: torch.Tensor, source: ActivationCache | HostPrefetcher, step: int
    ) -> None:
        """Takes latents and solver history outside `mask` from `source` as of `step`."""
        keep = mask[None, None].to(self.latents.device)
        self.latents = torch.where(keep, self.latents, source.get("latents", step))
        history = self._history or []
        for back in range(len(history)):
            position, recorded_step = len(history) - 1 - back, step - back
            if history[position] is not None and recorded_step >= 0:
                cached = source.get("solver_history", recorded_step)
                history[position] = torch.where(keep, history[position], cached)


class Engine:
    """Loads a diffusion model once and generates and edits sessions with it."""

    def __init__(self, model: DiffusionModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.state = StepState(config=self.config.sparse)
        self.layers = wrap_unet(model.unet, self.state)
        self.step_graphs = StepGraphs(self)
        """Captured UNet calls, replayed by every run (dense) and edit (sparse) they fit."""
        self._text_keys_values: tuple[PromptEmbeddings, torch.Tensor] | None = None
        if self.config.channels_last:
            model.unet.to(memory_format=torch.channels_last)

    @classmethod
    def from_pretrained(cls, source: str, config: EngineConfig | None = None) -> "Engine":
        """Loads an SD 1.x, SD 2.x or SDXL pipeline from a directory or a hub id; `tiny`,
        `tiny-sd2` and `tiny-sdxl` are small random models built locally (as in the CLI)."""
        config = config or EngineConfig()
        dtype = getattr(torch, config.dtype)
        return cls(load_model(source, device=config.device, dtype=dtype), config)

    def generate(
        self, prompt: str, *, on_step: StepCallback | None = None, **params
    ) -> "EditSession":
        """Generates an image and returns a session holding its recorded state (version 0).

        `params` are GenerationParams' fields (`height` and `width` in pixels, multiples of
        the model's `size_multiple`). A prompt longer than the text encoder takes is
        truncated with a PromptTruncatedWarning, and the report says what was read.
        `on_step` is called after every step.
        """
        params = self.filled_in(GenerationParams(prompt=prompt, **params))
        mask_steps = self.config.edit.mask_steps_for(params.steps)
        if mask_steps >= params.steps:
            warnings.warn(
                UneditableSessionWarning(
                    f"EditConfig.mask_steps ({mask_steps}) is not smaller than steps "
                    f"({params.steps}): edits of this session without a mask will fail; "
                    "leave mask_steps unset to take a fifth of the steps"
                ),
                stacklevel=2,
            )
        return EditSession(self, params, self.run_generation(params, on_step))

    def run_generation(
        self, params: GenerationParams, on_step: StepCallback | None = None
    ) -> Version:
        """Generates version 0 of a session with `params` (filled in, see `filled_in`)."""
        timer, macs = PhaseTimer(self.model.device), MacCount()
        with timer("text"):
            embeds = self.model.encode_for_guidance(params.prompt, params.negative_prompt)
        run = DenoiseRun(self, params, embeds, on_step)
        with timer("dense"):
            for step in self._steps(range(params.steps), "generate"):
                run.step(step, macs)
        with timer("decode"):
            image = self.model.decode(run.latents)
        report = EditReport(
            version=0,
            base_version=None,
            prompt=params.prompt,
            mask_source="none",
            mask_ratio=1.0,
            region_ratio=1.0,
            changed_pixel_ratio=1.0,
            dense_steps=params.steps,
            sparse_steps=0,
            dense_macs=macs.dense,
            executed_macs=macs.executed,
            mac_fraction=macs.fraction,
            sparse_step_mac_fraction=None,
            latency_s=timer.seconds,
            total_latency_s=sum(timer.seconds.values()),
            truncated_prompt=self.model.truncated_prompt(params.prompt),
            graph_capture_s=run.capture_s,
            cache_bytes=run.record.nbytes,
        )
        return Version(0, params.prompt, image, run.record, report)

    def filled_in(self, params: GenerationParams) -> GenerationParams:
        """`params` with the model's defaults where they are None, the size checked (also
        for recipes written before a field existed)."""
        model = self.model
        filled = params.model_copy(
            update={
                "scheduler": params.scheduler or default_scheduler(model.scheduler_config),
                "height": params.height or model.image_size,
                "width": params.width or model.image_size,
            }
        )
        model.latent_shape_at(filled.height, filled.width)
        return filled

    @contextmanager
    def unet_pass(
        self,
        step: int,
        macs: MacCount,
        plan: SparsePlan | None = None,
        source: ActivationCache | HostPrefetcher | None = None,
        record: ActivationCache | StepSlots | StepMaps | None = None,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        time_projections: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """UNet calls inside run as denoise step `step`: sparse over `plan` reading `source`,
        as the plan's config says (dense without a plan), recording into `record` when given,
        counting into `macs`; `text`: the text embeddings the calls get and their
        `text_keys_values`, when computed before; `time_projections`: the step's row of
        the run's `time_projections`, when computed before."""
        state = self.state
        state.step, state.plan, state.source = step, plan, source
        state.record, state.macs = record, macs
        state.config = self.config.sparse if plan is None else plan.config
        state.shared.forget()
        if text is not None:
            state.shared.text.given(*text)
        if time_projections is not None:
            state.shared.given_time_projections(time_projections)
        try:
            with record.reading() if isinstance(record, StepMaps) else nullcontext():
                yield
        finally:
            state.plan = state.source = state.record = None
            state.config = self.config.sparse
            # A UNet call outside a pass computes its shared linears itself.
            state.shared.forget()

    @torch.no_grad()
    def text_keys_values(self, embeds: PromptEmbeddings) -> torch.Tensor:
        """Every cross-attention's keys and values of `embeds.hidden`, stacked, as steps
        read them: they stay the same over a run's steps, so a run computes them once
        (for the embeddings it last got), not at every step."""
        if self._text_keys_values is None or self._text_keys_values[0] is not embeds:
            self._text_keys_values = (embeds, self.state.shared.text.compute(embeds.hidden))
        return self._text_keys_values[1]

    @torch.no_grad()
    def time_projections(self, timesteps: torch.Tensor, added: dict | None) -> torch.Tensor | None:
        """The resnets' time projections at each of a run's `timesteps` [S], for its
        guidance batch of two with the added conditions `added`: [S, 2, total], a row per
        step for `unet_pass` (see `SharedLinears.time_projections`); None where the UNet's
        time embedding depends on more than these."""
        emb = time_embeddings(self.model.unet, timesteps, added, batch=2)
        return None if emb is None else self.state.shared.time_projections(emb)

    def check_edit(
        self, generation: GenerationParams, prompt: str, mask, mask_steps: int | None
    ) -> tuple[EditParams, torch.Tensor | None]:
        """An edit's request checked against a session generated with `generation` (filled
        in): its EditParams, and its mask (as `edit` takes it, or None) at the latent size.
        ValueError naming the field (`mask_steps`) otherwise, or from `load_mask`."""
        params = EditParams.for_session(
            prompt, mask_steps, mask is not None, generation.steps, self.config.edit
        )
        return params, None if mask is None else self.load_mask(mask, generation)

    def load_mask(self, mask, generation: GenerationParams) -> torch.Tensor:
        """A mask as `edit` takes it, as a bool tensor at the latent size of a session
        generated with `generation` (filled in); ValueError if it is empty or fits neither
        the latent nor the image size."""
        latent_hw = self.model.latent_shape_at(generation.height, generation.width)[1:]
        return load_mask(mask, latent_hw, self.model.vae_scale_factor)

    def step_maps(
        self, record: ActivationCache, source, step: int, reads: frozenset[str]
    ) -> StepMaps:
        """Where an eager sparse step records into `record` at `step`, the maps it reads
        (`reads`, see sparse_reads) filled from `source` (the previous version's cache, or
        its prefetcher)."""
        maps = StepMaps(record, source, step, reads)
        maps.fill(source, step)
        return maps

    def edits_in_place(self, cache: ActivationCache) -> bool:
        """Whether an edit may record into `cache`'s own memory: no other session reads it,
        and it is on the model's device."""
        return (
            not (cache.read_only or cache.host_resident)
            and cache.device.type == self.model.device.type
        )

    def check_recorded_maps(self, names: Collection[str]) -> None:
        """Raises ValueError unless a cache holding maps `names` (from a snapshot, say)
        holds every map this engine's layers record, for each layer that recorded any (one
        at a resolution that runs dense records none): one recorded under another
        SparseConfig (`cached_keys_values`, or a `block_size` that decides which resnets
        record their output) may not."""
        names = set(names)
        missing = []
        for layer in self.layers:
            maps = [f"{layer.name}.{key}" for key in layer.recorded]
            if any(name in names for name in maps):
                missing += [name for name in maps if name not in names]
        missing.sort()
        if missing:
            sparse = self.config.sparse
            raise ValueError(
                f"the cache lacks {len(missing)} maps this engine's sparse steps read "
                f"({missing[0]}, ...): it was recorded under another SparseConfig; edit it "
                f"with the one it was recorded with (this engine has cached_keys_values="
                f"{sparse.cached_keys_values}, block_size={sparse.block_size})"
            )

    def sparse_reads(self, plan: SparsePlan, cache: ActivationCache) -> frozenset[str]:
        """The names in `cache` a sparse step over `plan` reads (its layers' maps)."""
        return sparse_reads(self.layers, plan, cache)

    @property
    def graphs(self) -> bool:
        """Whether UNet calls are captured and replayed as CUDA graphs."""
        return self.config.cuda_graphs and self.model.device.type == "cuda"

    def same_text_embeddings(self, prompt: str, other: str) -> bool:
        """Whether two prompts condition the UNet identically (the text encoder may map
        different strings, e.g. differing in case or spacing, to the same embeddings)."""
        if prompt == other:
            return True
        first, second = (self.model.encode_prompts([p]) for p in (prompt, other))
        same_pooled = first.pooled is None or torch.equal(first.pooled, second.pooled)
        return same_pooled and torch.equal(first.hidden, second.hidden)

    def _steps(self, steps: range, label: str) -> Iterator[int]:
        return tqdm(steps, desc=label, disable=not self.config.progress, leave=False)

    def run_edit(
        self,
        session: "EditSession",
        params: EditParams,
        mask: torch.Tensor | None,
        reference: ReferenceMode | None = None,
        base: Version | None = None,
        on_step: StepCallback | None = None,
        in_place: bool = False,
    ) -> Version:
        """Edits the session's current version (or `base`, one of its versions with its cache)
        into a new one, numbered after the session's newest, without changing the session.
        `in_place` records into the memory of `base`'s cache (`edits_in_place` must allow
        it): no copy of it is made, it holds the new version's maps afterwards, and sparse
        steps replay the graphs an earlier edit captured there.

        With a `reference` mode it computes a reference of the sparse edit instead, over the
        same mask: "steps" runs every step dense and pastes the previous latents outside the
        mask after each (the edit the sparse steps approximate); "layers" runs every layer
        dense and pastes the previous version's cached maps outside each layer's region
        (what the sparse steps compute, done the slow way).
        `params` must be valid for the session (EditParams.for_session). `on_step` is
        called after every step, dense or sparse.
        """
        base = session.current if base is None else base
        generation, user_mask = session.params, mask
        timer, macs, sparse_macs = PhaseTimer(self.model.device), MacCount(), MacCount()
        with timer("text"):
            embeds = self.model.encode_for_guidance(params.prompt, generation.negative_prompt)
        edited = generation.model_copy(update={"prompt": params.prompt})
        if in_place and (reference is not None or not self.edits_in_place(base.cache)):
            raise ValueError(
                "only an edit of a cache no other session reads, on the model's device, "
                "records in place (a reference never does)"
            )
        record = base.cache.edited_in_place() if in_place else None
        run = DenoiseRun(self, edited, embeds, on_step, record)
        source = base.cache.reader(self.model.device)
        dense_steps = params.mask_steps
        with timer("mask"):
            diffs = []
            for step in self._steps(range(dense_steps), "edit: capture"):
                run.step(step, macs)
                diffs.append(latent_difference(run.latents, source.get("latents", step)))
            if mask is None:
                mask = target_area_capture(diffs)
        mask_ratio = float(mask.float().mean())
        config = self.config.sparse
        if reference == "layers":
            config = config.model_copy(update={"kernels": "dense"})
        plan = SparsePlan(mask.to(self.model.device), config, self.model.device)
        mask = plan.region
        dense_reference = reference == "steps"
        prefetcher = source if isinstance(source, HostPrefetcher) else None
        reads = frozenset() if dense_reference else self.sparse_reads(plan, base.cache)
        with timer("sparse"):
            if dense_steps:
                run.reset_outside(mask, source, dense_steps - 1)
            label = "edit: sparse" if reference is None else f"edit: {reference} reference"
            for step in self._steps(range(dense_steps, generation.steps), label):
                if dense_reference:
                    run.step(step, macs)
                    run.reset_outside(mask, source, step)
                else:
                    if prefetcher is not None:
                        prefetcher.load(step, reads)
                    step_macs = MacCount()
                    run.step(step, step_macs, plan, source, reads)
                    macs.add(step_macs.dense, step_macs.executed)
                    sparse_macs.add(step_macs.dense, step_macs.executed)
        with timer("decode"):
            image = self.model.decode(run.latents)
        edit, changed_pixel_ratio = self.config.edit, 1.0
        if edit.preserve_background:
            with timer("compose"):
                weight = blend_weight(mask, image.shape[:2], edit.seam_dilation, edit.seam_feather)
                image = preserve_background(image, base.image, weight)
            changed_pixel_ratio = float((weight > 0).mean())
        number = len(session.history)
        report = EditReport(
            version=number,
            base_version=base.number,
            prompt=params.prompt,
            mask_source="user" if user_mask is not None else "capture",
            mask_ratio=mask_ratio,
            region_ratio=float(mask.float().mean()),
            changed_pixel_ratio=changed_pixel_ratio,
            dense_steps=dense_steps,
            sparse_steps=generation.steps - dense_steps,
            dense_macs=macs.dense,
            executed_macs=macs.executed,
            mac_fraction=macs.fraction,
            sparse_step_mac_fraction=None if dense_reference else sparse_macs.fraction,
            latency_s=timer.seconds,
            total_latency_s=sum(timer.seconds.values()),
            truncated_prompt=self.model.truncated_prompt(params.prompt),
            graph_capture_s=run.capture_s,
            host_bytes=0 if prefetcher is None else prefetcher.copied_bytes,
            cache_bytes=run.record.nbytes,
        )
        return Version(
            number, params.prompt, image, run.record, report, mask.cpu(), params, user_mask
        )


@dataclass
class EditSession:
    """A generated image and its tree of edits; each edit diffs against the version it
    extends, by default the current one.

    Versions are numbered in the order they were made: the generation is 0 and each edit
    takes the next number, whichever version it extends, so `history[n]` is version n and
    each version names its `parent`. Editing an older version makes a branch beside the
    later ones, which stay in the history. Only the current version holds its cache, and an
    edit records into it in place (unless forks share it), so the new version holds it after;
    moving to another version (`checkout`, `undo`, `edit(extends=n)`) restores that version's
    cache from its snapshot in `snapshots`, or recomputes it from its nearest ancestor that
    holds one (else from the generation), exactly as it was made.
    """

    engine: Engine
    params: GenerationParams
    current: Version
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[Version] = field(default_factory=list)
    snapshots: "ObjectStore | None" = None
    """The store this session's snapshots are written to, if any (see engine.snapshot)."""

    def __post_init__(self) -> None:
        if not self.history:
            self.history.append(self.current)

    @property
    def version(self) -> int:
        return self.current.number

    @property
    def image(self) -> np.ndarray:
        return self.current.image

    @property
    def pil_image(self) -> Image.Image:
        return self.current.pil_image

    @property
    def prompts(self) -> list[str]:
        """Every version's prompt, by version number."""
        return [v.prompt for v in self.history]

    def fork(self) -> "EditSession":
        """A new session at this one's current version, sharing its cache read-only.

        Edits of the fork never change this session: editing each of several forks of one
        version gives independent variations of it, all from the one recorded cache.
        """
        history = [replace(v, cache=None) for v in self.history]
        start = history[self.version]
        start.cache = self.current_cache()
        start.cache.read_only = True
        return EditSession(self.engine, self.params, start, history=history)

    def edit(
        self,
        prompt: str,
        mask=None,
        mask_steps: int | None = None,
        extends: int | None = None,
        on_step: StepCallback | None = None,
    ) -> Version:
        """Edits version `extends` (by default the current one); on success the new version,
        numbered after the newest, becomes current.

        Extending another version than the current one first moves the session to it (as
        `checkout`), so the edit branches off there; the input is checked before that.

        `mask` (a PNG path, array or tensor, at latent or image size) replaces Target Area
        Capture. `mask_steps` dense steps run first: by default the configured k (a fifth of
        the steps unless set) without a mask and none with one. `on_step` is called after
        every step. On bad input the session stays at its current version; an edit that
        fails after the move stays at `extends`.

        A prompt with the extended version's text embeddings changes nothing: that version
        itself is returned, no new version is made, the session stays at its current
        version (nothing is recomputed), and NoChangeWarning is issued (compare the returned
        version's number with the one you extended).
        """
        base = self.current if extends is None else self._version(extends)
        params, user_mask = self._validate(prompt, mask, mask_steps)
        if self.engine.same_text_embeddings(params.prompt, base.prompt):
            warnings.warn(
                NoChangeWarning(
                    f"{params.prompt!r} has the same text embeddings as version "
                    f"{base.number}'s prompt {base.prompt!r}: nothing to edit, "
                    f"the session stays at version {self.version}"
                ),
                stacklevel=2,
            )
            return base
        self.checkout(base.number)
        version = self._edit_from(base, params, user_mask, on_step, owned=True)
        self._move_to(version, version.cache)
        self.history.append(version)
        return version

    def makes_new_version(
        self, prompt: str, mask=None, mask_steps: int | None = None, extends: int | None = None
    ) -> bool:
        """Whether `edit` with these arguments would make a new version: not when the prompt
        has the extended version's text embeddings. Bad input raises as `edit` would."""
        base = self.current if extends is None else self._version(extends)
        params, _ = self._validate(prompt, mask, mask_steps)
        return not self.engine.same_text_embeddings(params.prompt, base.prompt)

    def edit_bytes(self, extends: int | None = None) -> int:
        """Bytes an edit of version `extends` (by default the current one) holds beyond the
        session's cache while it runs. Another version's cache is made beside the current
        one's (restored or recomputed; every version's is as large), then recorded into in
        place. The current version's edit needs none when it records into its cache in
        place, else a new cache as large."""
        cache = self.current_cache()
        if extends not in (None, self.version) or not self.engine.edits_in_place(cache):
            return cache.nbytes
        return 0

    def current_cache(self) -> ActivationCache:
        """The current version's cache, recomputed first (as `checkout` does) when an edit
        that failed while recording into it in place left it without one."""
        return self.checkout(self.version).cache

    def checkout(self, number: int) -> Version:
        """Makes version `number` current, with its cache (restored or recomputed)."""
        version = self._version(number)
        if version is not self.current or version.cache is None:
            self._move_to(version, self._cache_of(version))
        return version

    def undo(self) -> Version:
        """Returns to the version the current one was edited from; later versions stay in
        the history (`checkout` or `edit(extends=n)` goes back to them)."""
        parent = self.current.parent
        if parent is None:
            raise UnknownVersionError(
                f"session {self.id} is at version {self.version}, its generation: "
                "there is nothing to undo"
            )
        return self.checkout(parent)

    def _edit_from(
        self,
        base: Version,
        params: EditParams,
        user_mask: torch.Tensor | None,
        on_step: StepCallback | None,
        owned: bool,
    ) -> Version:
        """Edits `base` into a new version, in place in `base`'s cache when this session may
        give it to the new version (`owned`) and the engine can: an edit that fails there
        leaves `base` without a cache, which is recomputed when next needed."""
        in_place = owned and self.engine.edits_in_place(base.cache)
        try:
            return self.engine.run_edit(
                self, params, user_mask, base=base, on_step=on_step, in_place=in_place
            )
        except BaseException:
            if in_place:
                base.cache = None
            raise

    def _move_to(self, version: Version, cache: ActivationCache) -> None:
        # Only the current version keeps its cache; others keep image, mask and report.
        self.current.cache = None
        version.cache = cache
        self.current = version

    def _version(self, number: int) -> Version:
        if not 0 <= number < len(self.history):
            raise UnknownVersionError(
                f"session {self.id} has no version {number} "
                f"(its versions are 0 to {len(self.history) - 1})"
            )
        return self.history[number]

    def _cache_of(self, version: Version) -> ActivationCache:
        """The cache `version` recorded: held, loaded from its snapshot, or recomputed from
        its nearest ancestor that has either (else from the generation)."""
        path = []  # the versions to recompute, newest first
        cache = self._held_or_stored_cache(version)
        while cache is None and version.parent is not None:
            path.append(version)
            version = self.history[version.parent]
            cache = self._held_or_stored_cache(version)
        if cache is None:
            cache = self.engine.run_generation(self.params).cache
        for later in reversed(path):
            # The current version's cache stays its own; caches made here are given on.
            owned = cache is not self.current.cache
            base = replace(version, cache=cache)
            cache = self._edit_from(base, later.edit, later.user_mask, None, owned).cache
            version = later
        return cache

    def _held_or_stored_cache(self, version: Version) -> ActivationCache | None:
        if version.cache is not None or self.snapshots is None:
            return version.cache
        # Imported here: the snapshot module builds sessions, so it imports this one.
        from fisedit.engine.snapshot import stored_cache

        return stored_cache(self.engine, self.snapshots, self.id, version.number)

    def reference_edit(
        self,
        prompt: str,
        mask=None,
        mask_steps: int | None = None,
        mode: ReferenceMode = "steps",
    ) -> Version:
        """A reference of `edit(prompt, mask)` over the same mask (captured the same way when
        not given). Mode "steps", the masked-dense reference: every step dense, the previous
        latents pasted outside the mask; the sparse edit approximates it. Mode "layers": every
        layer dense, the previous version's cached maps pasted outside each layer's region;
        the sparse edit computes exactly this. Returns the would-be version; the session is
        unchanged."""
        params, user_mask = self._validate(prompt, mask, mask_steps)
        self.current_cache()
        return self.engine.run_edit(self, params, user_mask, reference=mode)

    def _validate(self, prompt: str, mask, mask_steps: int | None):
        return self.engine.check_edit(self.params, prompt, mask, mask_steps)

    def load_mask(self, mask) -> torch.Tensor:
        """A mask as `edit` takes it, as a bool tensor at this session's latent size;
        ValueError if it is empty or fits neither the latent nor the image size."""
        return self.engine.load_mask(mask, self.params)
