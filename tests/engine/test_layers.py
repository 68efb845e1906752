"""Wrapped UNet layers: in sparse mode they equal the dense layer on the active region."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from fisedit.engine.cache import ActivationCache
from fisedit.engine.config import EngineConfig, SparseConfig
from fisedit.engine.kernels.group_norm import (
    block_statistics_reference,
    group_norm_affine_reference,
)
from fisedit.engine.kernels.launch import interpreting, recording_launches
from fisedit.engine.layers import (
    MacCount,
    MapGroupNorm,
    SparseConv,
    SparseResnet,
    SparseTransformer,
    StepState,
    time_embeddings,
    wrap_unet,
)
from fisedit.engine.models import load_model
from fisedit.engine.plan import SparsePlan
from fisedit.engine.session import Engine
from fisedit.engine.sparse_ops import gather_tokens, key_value_projection


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, EngineConfig(progress=False))


def _record_unet_call(engine, config: SparseConfig | None = None):
    """One dense, recording UNet call (under `config`, else the engine's), with the inputs
    every wrapped layer received."""
    inputs = {}

    def keep_input(layer, args, kwargs, output) -> None:
        inputs.setdefault(layer.name, (args, kwargs))

    hooks = [layer.register_forward_hook(keep_input, with_kwargs=True) for layer in engine.layers]
    torch.manual_seed(0)
    cache = ActivationCache(steps=1)
    engine.state.record, engine.state.config = cache, config or engine.config.sparse
    context = engine.model.encode_prompts(["", "a cat on a bench"]).hidden
    try:
        with torch.no_grad():
            engine.model.unet(torch.randn(2, 4, 32, 32), 500, encoder_hidden_states=context)
    finally:
        engine.state.record, engine.state.config = None, engine.config.sparse
        for hook in hooks:
            hook.remove()
    return cache, inputs


@pytest.fixture(scope="module")
def recorded(engine):
    return _record_unet_call(engine)


def _square_mask() -> torch.Tensor:
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:20, 10:22] = True
    return mask


def _sparse_call(
    engine,
    recorded,
    name: str,
    config: SparseConfig,
    mask: torch.Tensor,
    x: torch.Tensor | None = None,
    record: ActivationCache | None = None,
):
    """Runs layer `name` sparsely on its recorded input (or `x`, the same input changed in
    the region), recording into a new cache (or `record`) as an edit's step does; its cached
    output, where it records one, is zeroed first, so active pixels must be recomputed and
    inactive ones must come from the cache."""
    cache, inputs = recorded
    layer = next(layer for layer in engine.layers if layer.name == name)
    dense = _dense_output(recorded, name).clone()
    source = ActivationCache(steps=1)
    for key, tensor in cache.tensors.items():
        source.put(key, 0, tensor[0])
    if f"{name}.out" in source:
        source.tensors[f"{name}.out"].zero_()
    engine.state.config = config
    plan = engine.state.plan = SparsePlan(mask, config)
    engine.state.source = source
    reads = engine.sparse_reads(plan, source)
    record = ActivationCache(steps=1) if record is None else record
    engine.state.record = engine.step_maps(record, source, 0, reads)
    try:
        args, kwargs = inputs[name]
        args = args if x is None else (x, *args[1:])
        with torch.no_grad():
            out = layer(*args, **kwargs)
    finally:
        engine.state.plan = engine.state.source = engine.state.record = None
        engine.state.config = engine.config.sparse
    # A copy: a resnet that records no output writes the same map of its own every call.
    out = (out[0] if isinstance(out, tuple) else getattr(out, "sample", out)).clone()
    index = SparsePlan(mask, config).at(tuple(out.shape[-2:])).index
    return layer, dense, out, index


def _dense_output(recorded, name: str) -> torch.Tensor:
    """Layer `name`'s output in the recorded call: its recorded map, or for a resnet that
    records none (a transformer alone reads it) the input of that transformer."""
    cache, inputs = recorded
    if f"{name}.out" in cache:
        return cache.get(f"{name}.out", 0)
    (x, *_), _ = inputs[name.replace(".resnets.", ".attentions.")]
    return x


LAYERS = [
    ("conv_in", SparseConv),
    ("down_blocks.0.resnets.0", SparseResnet),
    ("down_blocks.0.attentions.0", SparseTransformer),
    ("down_blocks.0.downsamplers.0", SparseConv),
    ("up_blocks.1.upsamplers.0", SparseConv),
    ("up_blocks.2.resnets.0", SparseResnet),
    ("conv_out", SparseConv),
]


# This module's engine is on the CPU: Triton runs there only interpreted. On a GPU machine
# the Triton path is checked on CUDA tensors by tests/engine/kernels and test_session.
on_cpu_triton = pytest.mark.skipif(
    not interpreting(), reason="Triton runs CPU tensors only under TRITON_INTERPRET=1"
)


@pytest.mark.parametrize(
    "config",
    [
        SparseConfig(),
        pytest.param(SparseConfig(kernels="triton"), marks=on_cpu_triton),
        SparseConfig(kernels="dense"),
    ],
    ids=["default", "triton", "dense"],
)
@pytest.mark.parametrize(("name", "kind"), LAYERS)
def test_sparse_layer_equals_dense_layer_on_active_region(engine, recorded, name, kind, config):
    layer, dense, out, index = _sparse_call(engine, recorded, name, config, _square_mask())

    assert isinstance(layer, kind)
    assert 0 < index.numel() < out.shape[-1] * out.shape[-2]
    torch.testing.assert_close(
        gather_tokens(out, index), gather_tokens(dense, index), atol=1e-5, rtol=1e-4
    )
    inactive = torch.ones(out.shape[-2] * out.shape[-1], dtype=torch.bool)
    inactive[index] = False
    elsewhere = out.flatten(2)[:, :, inactive]
    if "out" in layer.recorded:
        assert torch.count_nonzero(elsewhere) == 0
    elif config.kernels == "dense":
        # A resnet that a transformer alone reads records no output: run whole, it pastes
        # nothing.
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-4)
    else:
        # Sparse, it writes its own map at the active pixels only (the rest stays NaN,
        # which any read would carry on).
        assert elsewhere.isnan().all()


def test_a_layer_records_only_what_sparse_steps_read(engine, recorded):
    """In diffusers' cross-attention blocks resnets[i] feeds attentions[i] alone, and a
    sparse transformer reads its input at active pixels only: no step reads such a resnet's
    output from the cache, so it records none. Layers at the 8x8 resolution, which sparse
    steps run dense (`dense_below` 16), record nothing. Every other layer records its
    output."""
    cache, _ = recorded

    def records(layer, key: str = "") -> bool:
        return any(name.startswith(f"{layer.name}.{key}") for name in cache.tensors)

    assert [layer.name for layer in engine.layers if not records(layer)] == [
        "down_blocks.1.downsamplers.0",
        "down_blocks.2.resnets.0",
        "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.1",
        "mid_block.attentions.0",
        "mid_block.resnets.0",
        "mid_block.resnets.1",
    ]
    assert [
        layer.name for layer in engine.layers if records(layer) and not records(layer, "out")
    ] == [
        "down_blocks.0.resnets.0",
        "down_blocks.1.resnets.0",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
    ]


def test_a_transformer_caches_its_blocks_self_attention_inputs_normalised(engine, recorded):
    """A sparse step takes self-attention's keys and values of inactive tokens from the
    cache: it keeps attn1's input, the block input after norm1 (normalising is per token, so
    cached rows need no work), not the block input it would normalise whole at every step."""
    cache, inputs = recorded
    name = "down_blocks.0.attentions.0"
    layer = next(layer for layer in engine.layers if layer.name == name)
    block = layer.inner.transformer_blocks[0]
    block_inputs = []
    hook = block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0]))
    args, kwargs = inputs[name]
    try:
        with torch.no_grad():
            layer.dense(*args, **kwargs)
    finally:
        hook.remove()

    assert layer.reads(SparsePlan(_square_mask(), SparseConfig()), cache) == [
        f"{name}.out",
        f"{name}.block0.attn1_in",
        f"{name}.norm_statistics",
    ]
    expected = block.norm1(block_inputs[0])
    torch.testing.assert_close(cache.get(f"{name}.block0.attn1_in", 0), expected)


@pytest.mark.parametrize(
    "config",
    [SparseConfig(), pytest.param(SparseConfig(kernels="triton"), marks=on_cpu_triton)],
    ids=["default", "triton"],
)
def test_a_sparse_resnet_normalises_an_input_changed_in_its_region_exactly(
    engine, recorded, config
):
    """Its GroupNorm statistics merge those of the region's blocks, computed again, with the
    recorded ones elsewhere: the output is the reference mode's (the layer run densely on
    the same maps), and the recorded statistics become those of the maps normalised."""
    name, mask = "down_blocks.0.resnets.0", _square_mask()
    (x, *_), _ = recorded[1][name]
    region = SparsePlan(mask, config).at(tuple(x.shape[-2:])).region
    changed = torch.where(region, x * 2 + torch.randn_like(x) + 3, x)
    reference = SparseConfig(kernels="dense")
    _, _, expected, _ = _sparse_call(engine, recorded, name, reference, mask, changed)
    record = ActivationCache(steps=1)

    layer, _, out, index = _sparse_call(engine, recorded, name, config, mask, changed, record)

    torch.testing.assert_close(
        gather_tokens(out, index), gather_tokens(expected, index), atol=1e-5, rtol=1e-4
    )
    norms = layer.inner.norm1, layer.inner.norm2
    inputs = changed, record.get(f"{name}.norm2_in", 0)
    for key, norm, normalised in zip(("norm1", "norm2"), norms, inputs, strict=True):
        statistics = record.get(f"{name}.{key}_statistics", 0)
        expected = block_statistics_reference(norm, normalised)
        torch.testing.assert_close(statistics, expected, atol=1e-4, rtol=1e-4)


@on_cpu_triton
@pytest.mark.parametrize(
    # Between them every kernel, and upsampled taps.
    "name",
    ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "up_blocks.1.upsamplers.0"],
)
def test_padding_the_active_pixels_to_a_bucket_changes_no_value(engine, recorded, name):
    # An L with arms off the 2 x 2 blocks: 144 active pixels at 32 x 32 padded to 160, 45 at
    # 16 x 16 padded to 64 (repeats of the last one, computed and written again).
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[5:25, 3:6] = True
    mask[22:25, 3:20] = True
    exact = SparseConfig(kernels="triton", bucketed=False)
    _, _, unpadded, index = _sparse_call(engine, recorded, name, exact, mask)
    _, _, padded, padded_index = _sparse_call(
        engine, recorded, name, SparseConfig(kernels="triton"), mask
    )

    assert padded_index.numel() > index.numel()
    # Equal up to rounding, not bit for bit: padding moves the second sample's rows within
    # the kernels' row blocks, and the interpreter's dot (numpy's BLAS) may round a row
    # differently by its place in a block. A wrong pixel would be off by far more.
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize(
    "config",
    [
        SparseConfig(cached_keys_values=True),
        pytest.param(SparseConfig(kernels="triton", cached_keys_values=True), marks=on_cpu_triton),
    ],
    ids=["default", "triton"],
)
def test_a_transformer_with_cached_keys_values_projects_the_active_tokens_only(
    engine, recorded, config
):
    """Recording keeps each block's self-attention keys and values, not its input; a sparse
    call writes the active tokens' into the step's map before attending over all of them
    (here their cached rows are zeroed first: only the call's own can make it right)."""
    name = "down_blocks.0.attentions.0"
    layer = next(layer for layer in engine.layers if layer.name == name)
    attn = layer.inner.transformer_blocks[0].attn1
    with_keys_values, inputs = _record_unet_call(engine, config)
    key = f"{name}.block0.attn1_kv"
    assert f"{name}.block0.attn1_in" not in with_keys_values
    normed = recorded[0].get(f"{name}.block0.attn1_in", 0)
    dense_keys_values = torch.cat([attn.to_k(normed), attn.to_v(normed)], dim=-1)
    torch.testing.assert_close(with_keys_values.get(key, 0), dense_keys_values)
    engine.state.config = config
    try:
        assert layer.reads(SparsePlan(_square_mask(), config), with_keys_values) == [
            f"{name}.out",
            key,
            f"{name}.norm_statistics",
        ]
    finally:
        engine.state.config = engine.config.sparse
    index = SparsePlan(_square_mask(), config).at((32, 32)).index
    with_keys_values.tensors[key][0][:, index] = 0

    record = ActivationCache(steps=1)
    _, dense, out, index = _sparse_call(
        engine, (with_keys_values, inputs), name, config, _square_mask(), record=record
    )

    torch.testing.assert_close(
        gather_tokens(out, index), gather_tokens(dense, index), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(record.get(key, 0), dense_keys_values, atol=1e-5, rtol=1e-4)


def test_active_only_attention_changes_only_the_attention_context(engine, recorded):
    name = "down_blocks.0.attentions.0"
    mask = _square_mask()
    _, dense, full_context, index = _sparse_call(engine, recorded, name, SparseConfig(), mask)
    config = SparseConfig(active_only_attention=True)
    _, _, local_context, _ = _sparse_call(engine, recorded, name, config, mask)

    assert not torch.allclose(gather_tokens(local_context, index), gather_tokens(dense, index))
    torch.testing.assert_close(
        gather_tokens(full_context, index), gather_tokens(dense, index), atol=1e-5, rtol=1e-4
    )


def test_empty_mask_returns_the_cached_output(engine, recorded):
    name = "down_blocks.0.attentions.0"
    empty = torch.zeros(32, 32, dtype=torch.bool)

    _, _, out, index = _sparse_call(engine, recorded, name, SparseConfig(), empty)

    assert index.numel() == 0
    assert torch.count_nonzero(out) == 0


def test_an_fp16_model_computes_its_group_norm_affines_in_fp32(tiny_model_dir):
    # An fp16 shift, bias - mean * scale, loses the normalised value's low bits when a
    # group's mean is large against its spread (see kernels/test_group_norm.py).
    config = EngineConfig(dtype="float16", progress=False)
    engine = Engine.from_pretrained(tiny_model_dir, config)
    resnets = [layer for layer in engine.layers if isinstance(layer, SparseResnet)]
    assert resnets
    generator = torch.Generator().manual_seed(0)

    geometry = SparsePlan(_square_mask()[::4, ::4], SparseConfig(dense_below=1)).at((8, 8))
    for layer in resnets:
        norm = layer.inner.norm1
        x = torch.randn(2, norm.num_channels, 8, 8, generator=generator).half() * 4 + 40
        cache = ActivationCache(steps=1)
        try:
            engine.state.record = cache
            norm(x)  # records the block statistics a sparse call reads
            engine.state.record = engine.step_maps(cache, cache, 0, frozenset())
            affine = layer.group_norm_affine(norm, x, geometry)
        finally:
            engine.state.record = None
        assert affine.dtype == torch.float32 and affine.shape == (2, 2, norm.num_channels)
        torch.testing.assert_close(affine, group_norm_affine_reference(norm, x))


def test_shared_linears_give_each_layer_its_output_and_recompute_in_each_call(engine):
    """Cross-attentions' keys and values of the text come from one matmul per UNet call; a
    new call recomputes them even for the same input buffer (as a graph capture must)."""
    shared = engine.state.shared.text
    attentions = [attn for attn in shared.layers]
    assert len(attentions) > 1
    text = torch.randn(2, 7, attentions[0].to_k.in_features)
    shared.forget()
    for attn in attentions:
        expected = torch.nn.functional.linear(text, *key_value_projection(attn))
        torch.testing.assert_close(shared.of(attn, text), expected)
    first = attentions[0]
    computed = shared.of(first, text).clone()
    text.mul_(2)
    # Within a call the matmul ran once; the next call sees the buffer's new values.
    assert torch.equal(shared.of(first, text), computed)
    shared.forget()
    expected = torch.nn.functional.linear(text, *key_value_projection(first))
    torch.testing.assert_close(shared.of(first, text), expected)


def test_stacked_linears_hold_the_models_weights_not_copies_of_them(tiny_model_dir):
    """The stacks a UNet call multiplies by (its resnets' time projections, its
    cross-attentions' text keys and values, each self-attention's keys and values) take no
    memory beyond the model's weights: each layer's weight becomes a view of its rows."""
    engine = Engine.from_pretrained(tiny_model_dir, EngineConfig(progress=False))
    weights = {name: p.clone() for name, p in engine.model.unet.named_parameters()}
    context = engine.model.encode_prompts(["", "a cat on a bench"]).hidden
    with torch.no_grad():
        engine.model.unet(torch.randn(2, 4, 32, 32), 500, encoder_hidden_states=context)

    def storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    shared = engine.state.shared
    stacks = [
        (shared.time, lambda resnet: [resnet.time_emb_proj.weight]),
        (shared.text, lambda attn: [attn.to_k.weight, attn.to_v.weight]),
    ]
    for linears, layer_weights in stacks:
        stacked, _ = linears.stacked
        assert len(linears.layers) > 1
        for key in linears.layers:
            parts = layer_weights(key)
            assert all(storage(part) == storage(stacked) for part in parts)
            assert torch.equal(stacked[linears.slices[key]], torch.cat(parts))
    transformers = [layer for layer in engine.layers if isinstance(layer, SparseTransformer)]
    assert transformers
    for layer in transformers:
        for attn in (block.attn1 for block in layer.inner.transformer_blocks):
            stacked, _ = layer.packed(attn, key_value_projection)
            assert storage(attn.to_k.weight) == storage(attn.to_v.weight) == storage(stacked)
    for name, p in engine.model.unet.named_parameters():
        assert torch.equal(p, weights[name]), name


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_a_runs_time_embeddings_are_those_the_unet_hands_its_resnets(tiny_model_dirs, variant):
    """A run's time embeddings, for all its steps in one call, equal what the UNet's call at
    each step gives its resnets (SDXL's with the pooled text and size conditions)."""
    model = load_model(tiny_model_dirs[variant])
    embeds = model.encode_for_guidance("a cat on a bench")
    added = model.added_conditions(embeds)
    timesteps = torch.tensor([999.0, 500.0, 1.5])
    resnet = next(m for m in model.unet.modules() if isinstance(m, ResnetBlock2D))
    handed = []
    hook = resnet.register_forward_pre_hook(lambda _, args: handed.append(args[1]))
    sample = torch.randn(2, *model.latent_shape)
    with torch.no_grad():
        for t in timesteps:
            model.unet(sample, t, encoder_hidden_states=embeds.hidden, added_cond_kwargs=added)
    hook.remove()
    table = time_embeddings(model.unet, timesteps, added, batch=2)
    assert table.shape == (3, *handed[0].shape)
    for row, temb in zip(table, handed, strict=True):
        torch.testing.assert_close(row, temb)


def test_resnets_take_the_time_projections_given_for_their_call(engine):
    """A run projects its time embeddings for every resnet and step at once; given a step's
    row, a call's resnets take their slices of it, whatever embedding the UNet passes them."""
    shared = engine.state.shared
    resnets = list(shared.time.layers)
    assert len(resnets) > 1
    emb = torch.randn(3, 2, resnets[0].time_emb_proj.in_features)
    table = shared.time_projections(emb)
    shared.forget()
    shared.given_time_projections(table[1])
    passed = torch.randn(2, emb.shape[-1])
    for block in resnets:
        expected = block.time_emb_proj(torch.nn.functional.silu(emb[1])) + block.conv1.bias
        torch.testing.assert_close(shared.time.of(block, passed), expected)
    shared.forget()


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_a_dense_call_takes_its_runs_projections_and_equals_the_diffusers_unet(
    tiny_model_dirs, variant
):
    """A dense call in a run (a generation's step) takes the time projections and text keys
    and values its run computed before its steps: no resnet's time_emb_proj and no
    attention's to_k or to_v runs, and its output is the unwrapped diffusers UNet's. A call
    outside a run, after it, computes its own."""
    plain = load_model(tiny_model_dirs[variant]).unet
    engine = Engine.from_pretrained(tiny_model_dirs[variant], EngineConfig(progress=False))
    model = engine.model
    embeds = model.encode_for_guidance("a cat on a bench")
    added = model.added_conditions(embeds)
    sample = torch.randn(2, *model.latent_shape)
    projected = [
        linear
        for module in model.unet.modules()
        if isinstance(module, ResnetBlock2D | Attention)
        for linear in (
            [module.time_emb_proj]
            if isinstance(module, ResnetBlock2D)
            else [module.to_k, module.to_v]
        )
    ]
    ran = []
    hooks = [linear.register_forward_hook(lambda *_: ran.append(1)) for linear in projected]

    def both(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"encoder_hidden_states": embeds.hidden, "added_cond_kwargs": added}
        return model.unet(sample, t, **kwargs).sample, plain(sample, t, **kwargs).sample

    t = torch.tensor(500.0)
    projections = engine.time_projections(t[None], added)[0]
    text = (embeds.hidden, engine.text_keys_values(embeds))
    with torch.no_grad():
        with engine.unet_pass(0, MacCount(), text=text, time_projections=projections):
            out, expected = both(t)
        assert not ran
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(*both(torch.tensor(20.0)))
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_a_dense_transformer_keeps_a_channels_last_map_channels_last(tiny_model_dirs, variant):
    """Diffusers' Transformer2DModel copies its output to NCHW; the wrapped one's dense call
    returns it in the layout of its input, with the same values (1x1 conv projections in SD
    1.5, linear ones in SD 2)."""
    plain = load_model(tiny_model_dirs[variant]).unet
    engine = Engine.from_pretrained(tiny_model_dirs[variant], EngineConfig(progress=False))
    layer = next(layer for layer in engine.layers if isinstance(layer, SparseTransformer))
    original = plain.get_submodule(layer.name)
    channels = layer.inner.config.in_channels
    x = torch.randn(2, channels, 8, 8).to(memory_format=torch.channels_last)
    context = torch.randn(2, 7, layer.inner.transformer_blocks[0].attn2.to_k.in_features)
    with torch.no_grad():
        out = layer(x, encoder_hidden_states=context, return_dict=False)[0]
        expected = original(x, encoder_hidden_states=context, return_dict=False)[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not expected.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)


def test_shared_linears_take_outputs_computed_before_the_call(engine):
    """A run's text stays the same over its steps: it computes their keys and values once
    and hands them to each call, which then multiplies nothing."""
    shared = engine.state.shared.text
    first, second = list(shared.layers)[:2]
    text = torch.randn(2, 7, first.to_k.in_features)
    computed = shared.compute(text)
    shared.forget()
    shared.given(text, computed)
    # Served from the given outputs, by identity: changing them shows through.
    computed.mul_(2)
    expected = torch.nn.functional.linear(text, *key_value_projection(second)) * 2
    torch.testing.assert_close(shared.of(second, text), expected)
    assert shared.of(first, text).data_ptr() == computed.data_ptr()


def test_every_group_norm_of_the_unet_becomes_a_map_group_norm_with_its_parameters(
    tiny_model_dir,
):
    unet = load_model(tiny_model_dir, "cpu", torch.float32).unet
    weights = {m.weight for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)}

    layers = wrap_unet(unet, StepState())

    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(norm) is MapGroupNorm for norm in norms)
    assert {norm.weight for norm in norms} == weights
    head = next(layer for layer in layers if layer.name == "conv_out")
    assert head.norm is head.inner.norm


@pytest.mark.parametrize("silu", [False, True], ids=["norm", "norm+silu"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_map_group_norm_keeps_a_channels_last_map_channels_last(device, silu):
    """On CPU PyTorch's GroupNorm keeps the layout itself, so it runs; elsewhere (where it
    would copy the map to NCHW) the Triton path runs, here recorded on the meta device, with
    a SiLU after the norm in its second kernel."""
    state = StepState(config=SparseConfig(kernels="triton"))
    norm = MapGroupNorm(torch.nn.GroupNorm(4, 32, eps=1e-6), state).to(device)
    x = torch.randn(2, 32, 8, 8, device=device).to(memory_format=torch.channels_last)

    with recording_launches(132) as launches:
        out = norm(x, silu=silu)

    kernels = [(launch.kernel.fn.__name__, launch.kwargs.get("SILU")) for launch in launches]
    expected = [("_group_norm_affine_kernel", None), ("_group_norm_apply_kernel", silu)]
    assert kernels == ([] if device == "cpu" else expected)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    if device == "cpu":
        normed = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
        torch.testing.assert_close(out, torch.nn.functional.silu(normed) if silu else normed)


@pytest.mark.skipif(interpreting(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_on_a_gpu_a_map_group_norm_is_group_norm_in_the_maps_layout(dtype):
    norm = torch.nn.GroupNorm(8, 64, eps=1e-6).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    mapped = MapGroupNorm(norm, StepState(config=SparseConfig(kernels="auto")))
    x = (torch.randn(2, 64, 24, 24, device="cuda") * 3 + 1).to(dtype)
    x = x.to(memory_format=torch.channels_last)

    out, activated = mapped(x), mapped(x, silu=True)

    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    assert activated.is_contiguous(memory_format=torch.channels_last)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, norm(x), **tolerance)
    # fp16: the SiLU of diffusers' rounded norm rounds twice, the fused one once.
    tolerance = tolerance or {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(activated, torch.nn.functional.silu(norm(x)), **tolerance)
