"""UNet steps through static buffers (captured as CUDA graphs on a GPU) give the eager result."""

import numpy as np
import pytest
import torch

from fisedit.engine import EditConfig, Engine, EngineConfig, SparseConfig
from fisedit.engine.images import psnr
from fisedit.engine.kernels.launch import interpreting

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _chain(path: str, engine_class=Engine, **config):
    """A generation and two edits: each version with a copy of its recorded cache (the next
    version records into it in place)."""
    config = EngineConfig(progress=False, edit=EditConfig(mask_steps=3), **config)
    engine = engine_class.from_pretrained(path, config)
    session = engine.generate("a cat", steps=10, seed=5)
    versions = []
    for prompt in ("a dog", "a dog in the rain"):
        versions.append((session.current, session.current.cache.to("cpu").tensors))
        session.edit(prompt)
    versions.append((session.current, session.current.cache.to("cpu").tensors))
    return engine, versions


def test_the_static_step_path_records_exactly_what_eager_steps_record(
    tiny_model_dir, static_step_engine
):
    _, eager = _chain(tiny_model_dir)
    engine, static = _chain(tiny_model_dir, static_step_engine)

    (dense_graph,) = engine.step_graphs.dense.values()
    assert dense_graph.captured and dense_graph.graph is None
    for (version, cache), (eager_version, eager_cache) in zip(static, eager, strict=True):
        assert cache.keys() == eager_cache.keys()
        for name, tensor in eager_cache.items():
            assert torch.equal(cache[name], tensor), (version.number, name)
        assert version.report.executed_macs == eager_version.report.executed_macs
        if version.mask is not None:
            assert torch.equal(version.mask, eager_version.mask)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_captured_steps_give_the_eager_latents(tiny_model_dir, dtype):
    options = dict(device="cuda", dtype=dtype)
    _, eager = _chain(tiny_model_dir, cuda_graphs=False, **options)
    engine, captured = _chain(tiny_model_dir, **options)

    tolerance = {"atol": 1e-3, "rtol": 1e-3}
    for (version, cache), (eager_version, eager_cache) in zip(captured, eager, strict=True):
        torch.testing.assert_close(cache["latents"], eager_cache["latents"], **tolerance)
        assert version.report.executed_macs == eager_version.report.executed_macs
        assert eager_version.report.graph_capture_s == 0
        if version.mask is not None:
            assert torch.equal(version.mask, eager_version.mask)
    (dense_graph,) = engine.step_graphs.dense.values()
    assert dense_graph.graph is not None
    # The generation captures the dense step, the first edit its sparse step.
    assert captured[0][0].report.graph_capture_s > 0
    assert captured[1][0].report.graph_capture_s > 0


def _masks() -> list[torch.Tensor]:
    """Two squares of one size, a whole block of the coarsest sparse layer apart (2 x 2 at
    16 x 16: 4 latent pixels), and a third one larger: two plan signatures."""
    first = torch.zeros(32, 32, dtype=torch.bool)
    first[4:14, 6:16] = True
    larger = torch.zeros(32, 32, dtype=torch.bool)
    larger[4:24, 6:26] = True
    return [first, first.roll((8, 4), (0, 1)), larger]


def _edits_of_one_version(engine: Engine):
    """A generation, and edits of forks of it (so all read its cache), one per mask."""
    session = engine.generate("a cat", steps=2, seed=5)
    return session, [session.fork().edit("a dog", mask=mask) for mask in _masks()]


def test_captured_sparse_steps_record_into_their_own_edit_and_equal_eager_ones(
    tiny_model_dir, static_step_engine
):
    config = EngineConfig(progress=False)
    _, eager = _edits_of_one_version(Engine.from_pretrained(tiny_model_dir, config))
    engine = static_step_engine.from_pretrained(tiny_model_dir, config)
    _session, static = _edits_of_one_version(engine)

    for version, eager_version in zip(static, eager, strict=True):
        assert version.report.executed_macs == eager_version.report.executed_macs
        for name, tensor in eager_version.cache.tensors.items():
            assert torch.equal(version.cache.tensors[name], tensor), (version.mask.sum(), name)
    # Forks read one cache, so each edit records into a new one, with its own sparse step.
    assert [len(version.cache.graphs) for version in static] == [1, 1, 1]


@pytest.mark.parametrize("cached_keys_values", [False, True], ids=["default", "cached-kv"])
def test_the_triton_kernels_give_the_reference_edit_and_their_static_steps_the_eager_ones(
    tiny_model_dir, static_step_engine, cached_keys_values
):
    """The whole sparse path through the Triton kernels (on CUDA where a GPU is, interpreted
    elsewhere) against the PyTorch reference kernels; then through static buffers: kernels
    reading maps at a step index, skip connections' joins in two parts and static maps filled
    where the UNet reads them. A join's parts split the channel chunks where a concatenation
    does not, so sums may round differently. With cached keys and values, the projection
    writes the active tokens' into the step's map and the attention reads it there."""
    device = "cpu" if interpreting() else "cuda"
    edits = {}
    for name, engine_class, kernels in (
        ("reference", Engine, "reference"),
        ("eager", Engine, "triton"),
        ("static", static_step_engine, "triton"),
    ):
        config = EngineConfig(
            progress=False,
            device=device,
            sparse=SparseConfig(kernels=kernels, cached_keys_values=cached_keys_values),
            edit=EditConfig(preserve_background=False),
        )
        engine = engine_class.from_pretrained(tiny_model_dir, config)
        session = engine.generate("a cat", steps=3, seed=5)
        edits[name] = session.edit("a dog", mask=_masks()[0], mask_steps=1)
    reference, eager, static = edits.values()

    # On a GPU, tl.dot takes fp32 inputs as TF32.
    tolerance = 1e-4 if device == "cpu" else 1e-2
    torch.testing.assert_close(
        eager.cache.tensors["latents"],
        reference.cache.tensors["latents"],
        atol=tolerance,
        rtol=tolerance,
    )
    assert psnr(eager.image, reference.image) > (60 if device == "cpu" else 40)
    assert static.report.sparse_steps == 2
    tolerance = 1e-5 if device == "cpu" else 1e-2
    for name, tensor in eager.cache.tensors.items():
        torch.testing.assert_close(
            static.cache.tensors[name], tensor, atol=tolerance, rtol=tolerance, msg=name
        )


def _edit_chain(engine: Engine):
    """A generation and three edits of one session, one per mask, and after each edit the
    sparse steps its cache keeps."""
    session = engine.generate("a cat", steps=2, seed=5)
    kept = []
    for prompt, mask in zip(("a dog", "a fox", "a red fox"), _masks(), strict=True):
        session.edit(prompt, mask=mask)
        kept.append(dict(session.current.cache.graphs))
    return session, kept


def test_a_session_s_next_edit_with_a_similar_mask_replays_the_captured_sparse_step(
    tiny_model_dir, static_step_engine
):
    config = EngineConfig(progress=False)
    eager, _ = _edit_chain(Engine.from_pretrained(tiny_model_dir, config))
    static, kept = _edit_chain(static_step_engine.from_pretrained(tiny_model_dir, config))

    # Each edit records into the session's cache in place. The second mask has the first's
    # plan signature: its edit replays the step the first captured, over its own indices.
    # The larger third one captures a step of its own beside it.
    (first,) = kept[0].values()
    assert kept[1] == kept[0]
    assert len(kept[2]) == 2 and first in kept[2].values()
    for version, eager_version in zip(static.history, eager.history, strict=True):
        assert np.array_equal(version.image, eager_version.image), version.number
        assert version.report.executed_macs == eager_version.report.executed_macs
    for name, tensor in eager.current.cache.tensors.items():
        assert torch.equal(static.current.cache.tensors[name], tensor), name


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_an_edit_computes_its_text_keys_and_values_once_not_at_every_step(
    tiny_model_dir, static_step_engine, static
):
    engine_class = static_step_engine if static else Engine
    engine = engine_class.from_pretrained(tiny_model_dir, EngineConfig(progress=False))
    session = engine.generate("a cat", steps=3, seed=5)
    text, inputs = engine.state.shared.text, []
    compute = text.compute
    text.compute = lambda hidden: inputs.append(hidden) or compute(hidden)

    for prompt, mask in zip(("a dog", "a fox"), _masks(), strict=False):
        session.edit(prompt, mask=mask)
        assert session.current.report.sparse_steps == 3

    assert len(inputs) == 2
    assert not torch.equal(inputs[0], inputs[1])


@needs_cuda
def test_on_a_gpu_the_next_edit_with_a_similar_mask_captures_nothing(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, EngineConfig(device="cuda", progress=False))
    session, _ = _edit_chain(engine)

    capture_s = [version.report.graph_capture_s for version in session.history[1:]]
    assert capture_s[0] > 0 and capture_s[1] == 0 and capture_s[2] > 0


@needs_cuda
def test_every_capture_allocates_from_one_memory_pool(tiny_model_dir):
    config = EngineConfig(device="cuda", progress=False)
    eager_engine = Engine.from_pretrained(
        tiny_model_dir, config.model_copy(update={"cuda_graphs": False})
    )
    _, eager = _edits_of_one_version(eager_engine)
    engine = Engine.from_pretrained(tiny_model_dir, config)
    _session, edits = _edits_of_one_version(engine)

    assert all(version.report.graph_capture_s > 0 for version in edits)
    graphs = engine.step_graphs
    assert graphs.pool is not None
    assert all(step.graph.pool() == graphs.pool for step in graphs.dense.values())
    for version, eager_version in zip(edits, eager, strict=True):
        assert version.report.executed_macs == eager_version.report.executed_macs
        torch.testing.assert_close(
            version.cache.tensors["latents"],
            eager_version.cache.tensors["latents"],
            atol=1e-3,
            rtol=1e-3,
        )


# Every ordered pair of schedulers follows one another once: integer-timestep schedulers
# (DDIM, DPM-Solver++) before and after Euler's fractional timesteps.
SCHEDULER_ORDER = ["ddim", "dpm++", "euler", "ddim", "euler", "dpm++", "ddim"]


def _evenly_spaced(engine: Engine) -> Engine:
    """A checkpoint whose schedule spaces timesteps evenly: Euler's are then fractional."""
    config = engine.model.scheduler_config
    engine.model.scheduler_config = {**config, "timestep_spacing": "linspace"}
    return engine


def test_a_run_gives_the_same_latents_whatever_scheduler_ran_before(
    tiny_model_dir, static_step_engine
):
    config = EngineConfig(progress=False)
    eager = _evenly_spaced(Engine.from_pretrained(tiny_model_dir, config))
    expected = {
        name: eager.generate("a cat", steps=3, seed=5, scheduler=name).current.cache
        for name in set(SCHEDULER_ORDER)
    }
    engine = _evenly_spaced(static_step_engine.from_pretrained(tiny_model_dir, config))
    for previous, name in zip([None, *SCHEDULER_ORDER], SCHEDULER_ORDER, strict=False):
        cache = engine.generate("a cat", steps=3, seed=5, scheduler=name).current.cache
        assert torch.equal(cache.tensors["latents"], expected[name].tensors["latents"]), (
            f"{name} after {previous}"
        )
