"""A denoise run's UNet call, captured once as a CUDA graph and replayed every step.

Within one run every shape is static: the latents, and for sparse steps the mask, so every
index tensor and buffer. After an eager warm-up the whole UNet call (dense and recording,
or sparse) is captured; each step copies its inputs into static buffers and replays the
graph. The step index reaches the cache reads and writes through device memory, so nothing
in the replay depends on Python state, and no host sync happens inside the loop.
"""

import time

import torch

from fisedit.engine.cache import ActivationCache
from fisedit.engine.layers import MacCount
from fisedit.engine.models import PromptEmbeddings
from fisedit.engine.plan import SparsePlan


class CapturedUNetStep:
    """Runs the UNet calls of one run and one plan (None: dense) by replaying a CUDA graph."""

    def __init__(
        self,
        engine,
        plan: SparsePlan | None,
        source: ActivationCache | None,
        record: ActivationCache | None,
        embeds: PromptEmbeddings,
        added: dict | None,
    ) -> None:
        self.engine, self.plan, self.source, self.record = engine, plan, source, record
        self.embeds, self.added = embeds, added
        self.graph: torch.cuda.CUDAGraph | None = None
        self.step_macs = MacCount()
        self.capture_s = 0.0
        """Seconds spent on the warm-up call and the capture."""

    def _call(self, macs: MacCount) -> torch.Tensor:
        with self.engine.unet_pass(self.step, macs, self.plan, self.source, self.record):
            return self.engine.model.unet(
                self.sample,
                self.timestep,
                encoder_hidden_states=self.embeds.hidden,
                added_cond_kwargs=self.added,
            ).sample

    def _capture(self, sample: torch.Tensor, timestep: torch.Tensor, step: int) -> None:
        device = sample.device
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        self.sample = sample.clone()
        self.timestep = torch.as_tensor(timestep, device=device).clone()
        self.step = torch.tensor(step, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # Warm-up: builds the plan's indices, packs weights, allocates record buffers,
            # compiles kernels and counts MACs; every step replays, so one call is enough.
            self._call(self.step_macs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._call(MacCount())
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    @torch.no_grad()
    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, step: int, macs: MacCount
    ) -> torch.Tensor:
        if self.graph is None:
            self._capture(sample, timestep, step)
        self.sample.copy_(sample)
        self.timestep.copy_(torch.as_tensor(timestep))
        self.step.fill_(step)
        self.graph.replay()
        macs.add(self.step_macs.dense, self.step_macs.executed)
        return self.output
