"""The fused Triton sparse conv equals its PyTorch reference, which equals the dense layers.

Kernels run compiled on a GPU, or under Triton's interpreter on CPU tensors (set up by
tests/conftest.py), so shapes stay tiny.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine.kernels import sparse_conv
from fisedit.engine.kernels.group_norm import group_norm_affine, group_norm_affine_reference
from fisedit.engine.kernels.launch import (
    ChannelConcat,
    StepView,
    interpreting,
    recording_launches,
    with_step_views,
)
from fisedit.engine.kernels.sparse_conv import (
    pack_conv_weight,
    sparse_conv2d_reference,
    sparse_conv2d_triton,
)
from fisedit.engine.sparse_ops import conv_taps, gather_tokens

DEVICE = "cpu" if interpreting() else "cuda"
# On a GPU, tl.dot takes fp32 inputs as TF32.
ATOL, RTOL = (1e-4, 1e-4) if DEVICE == "cpu" else (1e-2, 1e-2)

# (C, C_out, input side, kernel, stride, padding, upsample)
LAYERS = {
    "3x3": (4, 6, 8, 3, 1, 1, 1),
    "3x3-c20": (20, 16, 8, 3, 1, 1, 1),
    "1x1": (8, 16, 8, 1, 1, 0, 1),
    "3x3-stride2": (8, 6, 8, 3, 2, 1, 1),
    "3x3-upsample2": (20, 6, 4, 3, 1, 1, 2),
    # Two channel chunks of 64, the second one partial.
    "1x1-c72": (72, 16, 4, 1, 1, 0, 1),
}


class Case:
    """A conv layer, an input, an active set of output pixels and its tap table."""

    def __init__(
        self, layer: str, active: str = "border", seed: int = 0, mean: float = 0.0
    ) -> None:
        channels, c_out, side, kernel, stride, padding, upsample = LAYERS[layer]
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, c_out, kernel, stride=stride, padding=padding)
        self.norm = nn.GroupNorm(2, channels)
        nn.init.normal_(self.norm.weight, generator=gen)
        nn.init.normal_(self.norm.bias, generator=gen)
        self.conv.requires_grad_(False).to(DEVICE)
        self.norm.requires_grad_(False).to(DEVICE)
        self.upsample = upsample
        self.x = (torch.randn(2, channels, side, side, generator=gen) + mean).to(DEVICE)
        self.out_hw = tuple(self.dense().shape[-2:])
        n_out = self.out_hw[0] * self.out_hw[1]
        self.index = {
            # Corners and edges read padding taps; n_out // 2 + 1 is inside.
            "border": torch.tensor([0, self.out_hw[1] - 1, n_out // 2 + 1, n_out - 1]),
            "single": torch.tensor([n_out // 2]),
            "all": torch.arange(n_out),
            "empty": torch.zeros(0, dtype=torch.long),
        }[active].to(DEVICE)
        self.taps = conv_taps(self.index, self.out_hw, (side, side), self.conv, upsample)
        self.residual = torch.randn(2, len(self.index), c_out, generator=gen).to(DEVICE)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=float(self.upsample)) if self.upsample > 1 else x

    def dense(self, normed: bool = False) -> torch.Tensor:
        x = F.silu(self.norm(self.x)) if normed else self.x
        return self.conv(self.upsampled(x))

    def affine(self) -> torch.Tensor:
        return group_norm_affine_reference(self.norm, self.x)


def _both(case: Case, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    args = (case.x, case.taps, case.conv.weight, case.conv.bias)
    return sparse_conv2d_triton(*args, **kwargs), sparse_conv2d_reference(*args, **kwargs)


@pytest.mark.parametrize("layer", LAYERS)
def test_reference_equals_dense_layers_at_active_pixels(layer):
    case = Case(layer, "all")
    args = (case.x, case.taps, case.conv.weight, case.conv.bias)
    plain = sparse_conv2d_reference(*args)
    torch.testing.assert_close(plain, gather_tokens(case.dense(), case.index), atol=ATOL, rtol=RTOL)

    # The affine and SiLU act per pixel, so they commute with the nearest upsampling.
    fused = sparse_conv2d_reference(
        *args, norm_affine=case.affine(), residual=case.residual, out_scale=0.5
    )
    expected = (gather_tokens(case.dense(normed=True), case.index) + case.residual) * 0.5
    torch.testing.assert_close(fused, expected, atol=ATOL, rtol=RTOL)


def test_reference_scatters_into_out_like_the_dense_layer():
    case = Case("3x3", "border")
    out = torch.zeros(2, 6, *case.out_hw, device=DEVICE)
    returned = sparse_conv2d_reference(
        case.x, case.taps, case.conv.weight, case.conv.bias, out=out, out_index=case.index
    )
    assert returned is out
    dense = case.dense()
    torch.testing.assert_close(gather_tokens(out, case.index), gather_tokens(dense, case.index))
    assert out.flatten(2).count_nonzero(dim=-1).max() == len(case.index)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "affine-residual"])
def test_triton_matches_reference(layer, fused):
    case = Case(layer, "border")
    kwargs = {}
    if fused:
        kwargs = dict(norm_affine=case.affine(), residual=case.residual, out_scale=0.7)
    got, expected = _both(case, **kwargs)
    assert got.shape == (2, len(case.index), case.conv.out_channels)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_a_per_sample_bias_adds_to_each_sample_like_a_time_embedding():
    case = Case("3x3", "border")
    per_sample = torch.randn(2, case.conv.out_channels, device=DEVICE)
    args = (case.x, case.taps, case.conv.weight, case.conv.bias + per_sample)

    got, expected = sparse_conv2d_triton(*args), sparse_conv2d_reference(*args)

    dense = case.dense() + per_sample[:, :, None, None]
    torch.testing.assert_close(expected, gather_tokens(dense, case.index), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("active", ["single", "all"])
def test_triton_matches_reference_for_one_and_all_pixels(active):
    case = Case("3x3-c20", active)
    got, expected = _both(case, norm_affine=case.affine())
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("layer", ["3x3-c20", "1x1-c72"])
def test_split_k_does_not_change_the_result(layer):
    case = Case(layer, "border")
    kwargs = dict(norm_affine=case.affine(), residual=case.residual)
    expected = sparse_conv2d_reference(
        case.x, case.taps, case.conv.weight, case.conv.bias, **kwargs
    )
    # K splits over 9 taps for the 3x3 layer and over 2 channel chunks for the 1x1 one;
    # more splits than chunks are clamped.
    for split_k in (1, 2, 3, 100):
        got = sparse_conv2d_triton(
            case.x, case.taps, case.conv.weight, case.conv.bias, split_k=split_k, **kwargs
        )
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("rows", "channels", "expected_splits"),
    [
        # SD 1.5 at a 15% mask, on an H100: 16x16 maps of 1280 channels have few rows and
        # 28 MiB of weights, which more programs pull at once.
        (128, 1280, 7),
        # 64x64 maps of 320 channels: 100 tiles, and 3 splits would write and read 4.7 MiB
        # of fp16 partials for 1.8 MiB of weights.
        (1280, 320, 1),
    ],
)
def test_split_k_by_default_only_where_its_partials_move_fewer_bytes_than_the_weights(
    rows, channels, expected_splits
):
    x = torch.empty(2, channels, 64, 64, dtype=torch.float16, device="meta")
    taps = torch.empty(rows // 2, 9, dtype=torch.long, device="meta")
    weight = torch.empty(channels, channels, 3, 3, dtype=torch.float16, device="meta")

    with recording_launches(multiprocessors=132) as launches:
        sparse_conv2d_triton(x, taps, weight)

    splits = launches[0].kwargs.get("PARTIAL") and launches[0].grid[2]
    assert (splits or 1) == expected_splits
    assert len(launches) == (1 if expected_splits == 1 else 2)


@pytest.mark.parametrize(
    ("partial_budget", "expected_splits"),
    # 16x16 maps of 1280 channels, SD 1.5 at 15%: each split's fp16 partials take 320 KiB,
    # written and read, against 28 MiB of weights. 7 splits fill the GPU.
    [(1.0, 7), (0.25, 7), (0.125, 5), (0.0, 1)],
)
def test_a_partial_budget_caps_the_bytes_the_splits_move(partial_budget, expected_splits):
    x = torch.empty(2, 1280, 16, 16, dtype=torch.float16, device="meta")
    taps = torch.empty(64, 9, dtype=torch.long, device="meta")
    weight = torch.empty(1280, 1280, 3, 3, dtype=torch.float16, device="meta")

    with recording_launches(multiprocessors=132) as launches:
        sparse_conv2d_triton(x, taps, weight, partial_budget=partial_budget)

    splits = launches[0].grid[2] if launches[0].kwargs["PARTIAL"] else 1
    assert splits == expected_splits
    partial_bytes = 2 * splits * 128 * 1280 * 2 if splits > 1 else 0
    assert partial_bytes <= partial_budget * weight.numel() * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_split_k_partials_are_in_the_convs_dtype(dtype):
    x = torch.empty(2, 1280, 16, 16, dtype=dtype, device="meta")
    taps = torch.empty(64, 9, dtype=torch.long, device="meta")
    weight = torch.empty(1280, 1280, 3, 3, dtype=dtype, device="meta")

    with recording_launches(multiprocessors=132) as launches:
        sparse_conv2d_triton(x, taps, weight)

    split, finalise = (dict(zip(run.kernel.arg_names, run.args, strict=False)) for run in launches)
    assert split["part_ptr"] is finalise["part_ptr"]
    assert split["part_ptr"].dtype == dtype
    assert split["part_ptr"].shape == (launches[0].grid[2], 128, 1280)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_a_linear_over_tokens_runs_as_a_1x1_conv_scattered_into_a_map(kernel):
    """A transformer's proj_out: tokens [B, P, C] read as a 1 x P map through taps that name
    each token, the linear's weight as a 1x1 conv's, rows + residual scattered into a map."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(20, 12).requires_grad_(False).to(DEVICE)
    tokens = torch.randn(2, 5, 20, generator=gen).to(DEVICE)
    residual = torch.randn(2, 5, 12, generator=gen).to(DEVICE)
    index = torch.tensor([0, 3, 9, 10, 15], device=DEVICE)
    out = torch.randn(2, 12, 4, 4, generator=gen).to(DEVICE)
    expected = out.clone()
    expected.flatten(2)[:, :, index] = (linear(tokens) + residual).transpose(1, 2)
    taps = torch.arange(5, device=DEVICE)[:, None]
    as_map = tokens.transpose(1, 2).unsqueeze(2)

    conv = sparse_conv2d_triton if kernel == "triton" else sparse_conv2d_reference
    got = conv(
        as_map, taps, linear.weight, linear.bias, residual=residual, out=out, out_index=index
    )

    assert got is out
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert torch.equal(pack_conv_weight(linear.weight), linear.weight.t())


@pytest.mark.parametrize("weight_format", ["nchw", "channels_last"])
def test_packed_weight_replaces_the_raw_weight(weight_format):
    """The kernel reads a packed weight with its strides: a channels_last conv weight (as the
    engine's are) packs as a view of itself, an NCHW one as a copy."""
    case = Case("3x3-stride2", "border")
    weight = case.conv.weight
    if weight_format == "channels_last":
        weight = weight.to(memory_format=torch.channels_last)
    packed = pack_conv_weight(weight)
    assert packed.shape == (9 * 8, 6)
    shares = packed.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert shares == (weight_format == "channels_last")
    got = sparse_conv2d_triton(case.x, case.taps, None, case.conv.bias, packed_weight=packed)
    expected = sparse_conv2d_reference(case.x, case.taps, case.conv.weight, case.conv.bias)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("x_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("out_format", ["nchw", "channels_last"])
def test_scatters_rows_into_out_in_place(x_format, out_format):
    case = Case("3x3-c20", "border")
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    x = case.x.to(memory_format=formats[x_format])
    base = torch.randn(2, 16, *case.out_hw, device=DEVICE).to(memory_format=formats[out_format])
    out, expected = base.clone(), base.clone()
    kwargs = dict(norm_affine=case.affine(), residual=case.residual, out_scale=0.5)

    returned = sparse_conv2d_triton(
        x, case.taps, case.conv.weight, case.conv.bias, out=out, out_index=case.index, **kwargs
    )
    sparse_conv2d_reference(
        x, case.taps, case.conv.weight, case.conv.bias, out=expected, out_index=case.index, **kwargs
    )

    assert returned is out and out.stride() == base.stride()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    inactive = torch.ones(case.out_hw[0] * case.out_hw[1], dtype=torch.bool, device=DEVICE)
    inactive[case.index] = False
    torch.testing.assert_close(out.flatten(2)[:, :, inactive], base.flatten(2)[:, :, inactive])


def _steps_of(value: torch.Tensor, step: int, steps: int = 3) -> StepView:
    """A StepView of a [steps, ...] buffer of noise with `value` at `step`."""
    buffer = torch.randn(steps, *value.shape, device=DEVICE)
    buffer[step] = value
    return StepView(buffer, torch.tensor([step], device=DEVICE))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_reads_and_scatters_into_maps_at_a_step_in_device_memory(kernel):
    """A captured sparse step reads a map of its run's cache at the step index and scatters
    into another: the same as on that step's maps, and no other step changes."""
    case = Case("3x3-c20", "border")
    base = torch.randn(2, 16, *case.out_hw, device=DEVICE)
    x, out = _steps_of(case.x, 1), _steps_of(base, 2)
    before = out.buffer.clone()
    # A per-sample bias sliced from a wider one, as resnets' time biases are.
    bias = torch.randn(2, 40, device=DEVICE)[:, 8:24]
    # The kernel addresses the step itself; the reference reads and writes back copies.
    conv = sparse_conv2d_triton if kernel == "triton" else with_step_views(sparse_conv2d_reference)
    args = (case.taps, case.conv.weight, bias, case.affine(), case.residual, 0.5)
    returned = conv(x, *args, out, case.index)

    expected = base.clone()
    sparse_conv2d_reference(case.x, *args, expected, case.index)
    assert returned is out
    torch.testing.assert_close(out.buffer[2], expected, atol=ATOL, rtol=RTOL)
    assert torch.equal(out.buffer[[0, 1]], before[[0, 1]])


@pytest.mark.parametrize("kernel", ["triton", "reference"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_reads_an_input_in_two_channel_parts_as_their_concatenation(kernel, split_k):
    """A resnet after a skip connection reads the two maps it joins, never concatenated:
    72 + 20 channels (the first part's last chunk of 64 partial), the second part a map at
    a step in device memory, with the GroupNorm affine of the whole."""
    case = Case("3x3-c20", "border")  # its taps, and a residual of 16 channels
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(2, 72, 8, 8, generator=gen).to(DEVICE)
    second = (
        torch.randn(2, 20, 8, 8, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    )
    whole = torch.cat([first, second], dim=1)
    conv = nn.Conv2d(92, 16, 3, padding=1).requires_grad_(False).to(DEVICE)
    norm = nn.GroupNorm(4, 92).requires_grad_(False).to(DEVICE)
    affine = group_norm_affine_reference(norm, whole)
    joined = ChannelConcat(first, _steps_of(second, 1))
    args = (case.taps, conv.weight, conv.bias, affine, case.residual, 0.5)

    if kernel == "triton":
        got = sparse_conv2d_triton(joined, *args, split_k=split_k)
    else:
        got = with_step_views(sparse_conv2d_reference)(joined, *args)
    torch.testing.assert_close(got, sparse_conv2d_reference(whole, *args), atol=ATOL, rtol=RTOL)


def test_empty_mask_launches_nothing(monkeypatch):
    def no_launch(*args):
        raise AssertionError("launched a kernel for an empty mask")

    monkeypatch.setattr(sparse_conv, "launcher", no_launch)
    case = Case("3x3", "empty")
    tokens = sparse_conv2d_triton(case.x, case.taps, case.conv.weight, case.conv.bias)
    assert tokens.shape == (2, 0, 6)
    assert sparse_conv2d_reference(case.x, case.taps, case.conv.weight).shape == (2, 0, 6)

    base = torch.randn(2, 6, *case.out_hw, device=DEVICE)
    out = base.clone()
    returned = sparse_conv2d_triton(
        case.x, case.taps, case.conv.weight, out=out, out_index=case.index
    )
    assert returned is out
    torch.testing.assert_close(out, base, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        # About the rounding of the normalised activations tl.dot takes in the model dtype
        # and of the output; with an fp16 affine, 5e-3 at mean/std 20 and 1.2e-2 at 50.
        (torch.float16, 1e-3),
        pytest.param(
            torch.bfloat16,
            1e-2,
            marks=pytest.mark.skipif(
                interpreting(), reason="Triton's interpreter computes bf16 tl.dot wrongly"
            ),
        ),
    ],
    ids=["fp16", "bf16"],
)
@pytest.mark.parametrize("mean_over_std", [0, 20, 50])
@pytest.mark.parametrize("split_k", [1, 9], ids=["unsplit", "split"])
def test_low_precision_matches_fp32_math_on_the_same_inputs(
    dtype, tolerance, mean_over_std, split_k
):
    # The engine's path: the GroupNorm kernel's affine of the map, applied by the conv kernel.
    # Split, the conv rounds its partial sums to its dtype, within the same tolerance.
    case = Case("3x3-c20", "border", mean=mean_over_std)
    x, weight, bias = (t.to(dtype) for t in (case.x, case.conv.weight, case.conv.bias))
    norm = case.norm.to(dtype)

    affine = group_norm_affine(norm, x)
    got = sparse_conv2d_triton(x, case.taps, weight, bias, norm_affine=affine, split_k=split_k)

    # Everything after the rounding of the inputs is done in fp32, the affine included.
    affine = group_norm_affine_reference(norm.float(), x.float())
    expected = sparse_conv2d_reference(x.float(), case.taps, weight.float(), bias.float(), affine)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_gpu_matches_reference():
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 96, 3, padding=1).requires_grad_(False).cuda().half()
    x = torch.randn(2, 64, 32, 32, generator=gen).cuda().half()
    x = x.to(memory_format=torch.channels_last)
    index = torch.randperm(32 * 32, generator=gen)[:150].sort().values.cuda()
    taps = conv_taps(index, (32, 32), (32, 32), conv)
    # GroupNorm affines are fp32 whatever the model dtype.
    affine = torch.stack([torch.rand(2, 64) + 0.5, torch.randn(2, 64)]).cuda()
    residual = torch.randn(2, 150, 96, generator=gen).cuda().half()
    kwargs = dict(norm_affine=affine, out_scale=0.5, out_index=index)
    out = torch.zeros(2, 96, 32, 32, device="cuda", dtype=torch.half)
    out = out.to(memory_format=torch.channels_last)
    expected = out.float()

    sparse_conv2d_triton(x, taps, conv.weight, conv.bias, residual=residual, out=out, **kwargs)
    # The reference in fp32 from the same fp16 inputs.
    weight, bias = conv.weight.float(), conv.bias.float()
    sparse_conv2d_reference(
        x.float(), taps, weight, bias, residual=residual.float(), out=expected, **kwargs
    )

    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
