import numpy as np
import pytest
import torch

from fisedit.engine import EditConfig, Engine, EngineConfig
from fisedit.engine.cache import ActivationCache, HostPrefetcher, StepMaps, StepSlots
from fisedit.engine.kernels.launch import ChannelConcat, StepView
from fisedit.engine.plan import SparsePlan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_step_is_read_at_an_int_or_an_index_tensor():
    cache = ActivationCache(steps=3)
    cache.put("x", 0, torch.zeros(2, 2))
    cache.put("x", 2, torch.full((2, 2), 7.0))

    assert cache.tensors["x"].shape == (3, 2, 2)
    assert torch.equal(cache.get("x", 2), cache.get("x", torch.tensor(2)))
    assert cache.get("x", torch.tensor(2)).sum() == 28 and cache.get("x", 0).sum() == 0
    assert cache.nbytes == 3 * 4 * 4


def test_channels_last_maps_are_recorded_and_read_channels_last():
    cache = ActivationCache(steps=3)
    maps = [torch.randn(2, 5, 4, 6).to(memory_format=torch.channels_last) for _ in range(3)]
    for step in range(3):
        cache.put("x", step, maps[step])

    for step in (1, torch.tensor(1)):
        read = cache.get("x", step)
        assert read.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(read, maps[1])


def test_moving_a_cache_can_change_the_layout_of_its_maps_only():
    maps = torch.randn(2, 1, 4, 3, 5)
    tokens = torch.randn(2, 1, 15, 4)
    cache = ActivationCache(steps=2, tensors={"map": maps, "tokens": tokens})

    nhwc = cache.to("cpu", channels_last=True)
    back = nhwc.to("cpu", channels_last=False)

    assert nhwc.tensors["map"][1].is_contiguous(memory_format=torch.channels_last)
    assert nhwc.tensors["tokens"].is_contiguous()
    assert back.tensors["map"].is_contiguous()
    for moved in (nhwc, back):
        assert torch.equal(moved.tensors["map"], maps)
        assert torch.equal(moved.tensors["tokens"], tokens)


def test_put_step_files_a_step_of_slots_in_one_go():
    slots = {"map": torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)}
    slots["affine"] = torch.randn(2, 2, 4)
    cache = ActivationCache(steps=2)

    cache.put_step(1, slots)

    assert cache.tensors["map"][1].is_contiguous(memory_format=torch.channels_last)
    for name, value in slots.items():
        assert torch.equal(cache.get(name, 1), value)


def test_step_slots_hold_a_map_as_made_and_copy_only_one_in_another_layout():
    """A captured dense step records without copying: a map in the cache's layout is held
    where the call made it (a graph's replay writes it there again); one in another layout
    is copied into a static slot of the cache's layout, which later calls refill."""
    slots = StepSlots(channels_last=True)
    nhwc = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    nchw = torch.randn(2, 4, 3, 5)

    slots.put("made", 0, nhwc)
    slots.put("converted", 0, nchw)
    slot = slots.tensors["converted"]
    again = torch.randn(2, 4, 3, 5)
    slots.put("converted", 1, again)

    assert slots.tensors["made"] is nhwc
    assert slots.tensors["converted"] is slot and torch.equal(slot, again)
    assert slot.is_contiguous(memory_format=torch.channels_last)


def test_a_channels_last_cache_stores_every_map_nhwc_whatever_layout_it_arrives_in():
    nchw, tokens = torch.randn(2, 4, 3, 5), torch.randn(2, 15, 4)
    slots = StepSlots(channels_last=True)
    slots.put("map", 0, nchw)
    slots.put("tokens", 0, tokens)
    recorded, filed = ActivationCache(steps=2, channels_last=True), ActivationCache(steps=2)

    recorded.put("map", 1, nchw)
    filed.put_step(1, slots.tensors)

    assert slots.tensors["map"].is_contiguous(memory_format=torch.channels_last)
    for cache in (recorded, filed):
        assert cache.tensors["map"][1].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cache.get("map", 1), nchw)
    assert filed.tensors["tokens"].is_contiguous()
    assert recorded.to("cpu").channels_last


def _previous_version(steps: int = 3) -> ActivationCache:
    cache = ActivationCache(steps, channels_last=True)
    for step in range(steps):
        for name in ("sparse.out", "sparse.norm2_in", "dense.out"):
            cache.put(name, step, torch.randn(2, 4, 3, 5))
    return cache


def _static_step(source: ActivationCache) -> tuple[StepMaps, torch.Tensor]:
    """Step 1 of an edit recording in place into `source`, with its step in device memory."""
    step = torch.tensor(1)
    maps = StepMaps(
        source.edited_in_place(), source, step, frozenset({"sparse.out", "sparse.norm2_in"})
    )
    maps.fill(source, 1)
    return maps, step


def test_a_step_in_device_memory_hands_the_unet_static_maps_of_sparse_outputs():
    source = _previous_version()
    maps, step = _static_step(source)

    # Every map is the cache at the step, which kernels address at the index; the UNet's
    # ops get a static map for a sparse layer's output, and kernels read the cache behind it.
    for name in ("sparse.out", "sparse.norm2_in", "dense.out"):
        assert isinstance(maps[name], StepView) and int(maps[name].step) == 1
        assert maps[name].buffer is source.tensors[name]
    static = maps.static("sparse.out")
    assert static.shape == (2, 4, 3, 5) and static.is_contiguous(memory_format=torch.channels_last)
    assert maps.static("sparse.norm2_in") is None and maps.static("dense.out") is None
    assert maps.behind(static) is maps["sparse.out"]
    other = torch.randn(2, 4, 3, 5)
    assert maps.behind(other) is other
    # A map written in place is left alone; a dense layer's output goes straight in.
    new = torch.randn(2, 4, 3, 5)
    maps.put("sparse.out", step, maps["sparse.out"])
    maps.put("dense.out", step, new)
    assert torch.equal(source.get("dense.out", 1), new)


def test_the_unet_s_ops_read_a_static_map_filled_from_the_cache_and_only_then():
    source = _previous_version()
    maps, _ = _static_step(source)
    static = maps.static("sparse.out").fill_(float("nan"))
    cached = source.get("sparse.out", 1)

    with maps.reading():
        # Shapes and layouts read no element: nothing is copied for them.
        assert static.shape[1] == 4 and static.dim() == 4 and static.dtype == torch.float32
    assert static.isnan().all()
    with maps.reading():
        doubled = static * 2
    assert torch.equal(doubled, cached * 2) and torch.equal(static, cached)


def test_a_skip_connection_s_concatenation_is_a_join_its_resnet_reads_in_parts():
    """torch.cat of a static map and a plain one along channels copies nothing: it gives a
    static map whose parts kernels read (`behind`); any other op reading it fills it with
    the concatenation, the static part's values taken from the cache."""
    source = _previous_version()
    maps, _ = _static_step(source)
    static = maps.static("sparse.out").fill_(float("nan"))
    plain = torch.randn(2, 3, 3, 5)

    with maps.reading():
        joined = torch.cat([plain, static], dim=1)
        parts = maps.behind(joined)
    assert isinstance(parts, ChannelConcat) and parts.shape == (2, 7, 3, 5)
    assert parts.first is plain and parts.second is maps["sparse.out"]
    assert static.isnan().all()
    with maps.reading():
        joined = torch.cat([plain, static], dim=1)
        doubled = joined * 2
        # Not along channels: the static map itself is filled first.
        stacked = torch.cat([static, static], dim=0)
    cached = source.get("sparse.out", 1)
    assert torch.equal(doubled, torch.cat([plain, cached], dim=1) * 2)
    assert torch.equal(stacked, torch.cat([cached, cached]))


def test_a_fork_s_step_fills_its_own_cache_from_the_shared_one():
    source = _previous_version()
    own = ActivationCache(source.steps, channels_last=True)
    reads = frozenset({"sparse.out", "sparse.norm2_in"})
    maps = StepMaps(own, source, torch.tensor(2), reads)
    maps.fill(source, 2)

    for name in reads:
        assert torch.equal(own.get(name, 2), source.get(name, 2))
        assert own.tensors[name] is not source.tensors[name]
        assert maps[name].buffer is own.tensors[name]


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match="nothing recorded under 'y'"):
        ActivationCache(steps=1).get("y", 0)


def test_on_cpu_the_reader_is_the_cache_itself():
    cache = ActivationCache(steps=1, tensors={"x": torch.zeros(1, 3)})

    assert cache.reader("cpu") is cache
    assert cache.to("cpu").tensors["x"].device.type == "cpu"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def test_the_prefetcher_copies_only_the_maps_a_step_loads_into_static_buffers():
    maps = {name: torch.randn(3, 1, 4, 2, 2) for name in ("a", "b", "unread")}
    cache = ActivationCache(steps=3, tensors={**maps, "latents": torch.randn(3, 1, 4, 2, 2)})
    prefetcher = HostPrefetcher(cache.to_host(), "cpu")
    step_bytes = _nbytes(maps["a"][0])

    prefetcher.load(0, frozenset({"a", "b"}))
    static = prefetcher.get("a", 0)
    # Step 1's maps are copied ahead, while step 0 runs.
    assert prefetcher.copied == {0: {"a": step_bytes, "b": step_bytes}, 1: prefetcher.copied[0]}
    assert torch.equal(prefetcher.get("latents", 0), cache.tensors["latents"][0])
    assert prefetcher.copied[0]["latents"] == step_bytes and "unread" not in prefetcher.copied[0]

    prefetcher.load(1, frozenset({"a", "b"}))
    assert prefetcher.get("a", 1) is static and torch.equal(static, maps["a"][1])
    assert prefetcher.get("a", torch.tensor(2)) is static  # what a captured step reads
    assert set(prefetcher.copied) == {0, 1, 2} and set(prefetcher.copied[2]) == {"a", "b"}
    with pytest.raises(KeyError, match="'unread' is not among the maps loaded"):
        prefetcher.get("unread", torch.tensor(1))


@pytest.mark.parametrize("steps_path", ["eager", "static"])
def test_a_host_resident_edit_reads_only_latents_in_capture_steps_and_equals_the_device_edit(
    tiny_model_dir, static_step_engine, steps_path
):
    # "static": the graph path (captured on a GPU), sparse steps over the static buffers.
    steps, k = 6, 2
    config = EngineConfig(progress=False, edit=EditConfig(mask_steps=k))
    engine_class = static_step_engine if steps_path == "static" else Engine
    engine = engine_class.from_pretrained(tiny_model_dir, config)
    on_device = engine.generate("a cat on a bench", steps=steps, seed=3)
    on_host = on_device.fork()
    cache = on_host.current.cache = on_device.current.cache.to_host()

    expected = on_device.edit("a dog on a bench")
    edit = on_host.edit("a dog on a bench")

    assert np.array_equal(edit.image, expected.image)
    for name, tensor in expected.cache.tensors.items():
        assert torch.equal(edit.cache.tensors[name], tensor), name
    reads = engine.sparse_reads(SparsePlan(edit.mask, engine.config.sparse), cache)
    step_bytes = {name: _nbytes(tensor[0]) for name, tensor in cache.tensors.items()}
    read_bytes = sum(step_bytes[name] for name in reads)
    # Sparse steps read no latents; layers whose resolution runs dense record nothing.
    assert "latents" not in reads and read_bytes < cache.nbytes / steps
    assert not any(name.startswith("mid_block.") for name in step_bytes)
    # Capture steps read the latents; before the sparse steps the latents and the two
    # solver outputs DPM-Solver++ keeps are reset outside the mask; sparse steps read `reads`.
    latents = step_bytes["latents"]
    assert edit.report.host_bytes == k * latents + 3 * latents + (steps - k) * read_bytes
    assert expected.report.host_bytes == 0


@needs_cuda
def test_host_resident_edit_with_prefetch_equals_device_edit(tiny_model_dir):
    config = EngineConfig(device="cuda", progress=False, edit=EditConfig(mask_steps=2))
    engine = Engine.from_pretrained(tiny_model_dir, config)
    on_device = engine.generate("a cat", steps=6, seed=9)
    on_host = engine.generate("a cat", steps=6, seed=9)
    on_host.current.cache = on_host.current.cache.to_host()

    assert isinstance(on_host.current.cache.reader("cuda"), HostPrefetcher)
    expected = on_device.edit("a dog").image
    edit = on_host.edit("a dog")
    assert np.array_equal(edit.image, expected)
    # The sparse steps replay a captured graph over the prefetcher's static buffers.
    assert engine.graphs and edit.report.graph_capture_s > 0 and edit.report.host_bytes > 0
