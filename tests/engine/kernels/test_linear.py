"""The Triton linear over token rows equals its PyTorch reference, and the reference the
diffusers layers it stands for.

Kernels run compiled on a GPU, or under Triton's interpreter on CPU tensors (set up by
tests/conftest.py).
"""

import pytest
import torch
from diffusers.models.activations import GEGLU
from torch import nn

from fisedit.engine.kernels.launch import StepView, interpreting
from fisedit.engine.kernels.linear import linear, linear_reference

DEVICE = "cpu" if interpreting() else "cuda"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _layer(features_in: int, features_out: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(features_in, features_out, bias=bias).requires_grad_(False).to(DEVICE)


def test_reference_is_the_linear_then_geglu_then_the_residual():
    tokens, residual = _randn(2, 5, 20), _randn(2, 5, 12, seed=1)
    layer = _layer(20, 12)
    expected = layer(tokens) + residual
    got = linear_reference(tokens, layer.weight, layer.bias, residual)
    torch.testing.assert_close(got, expected)
    activation = GEGLU(20, 12).requires_grad_(False).to(DEVICE)
    got = linear_reference(tokens, activation.proj.weight, activation.proj.bias, geglu=True)
    torch.testing.assert_close(got, activation(tokens))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("geglu", [False, True], ids=["linear", "geglu"])
def test_linear_matches_reference(bias, residual, geglu):
    # More rows than one program's tile and features that fill no tile evenly; x strided
    # (a transposed map's tokens), as the kernel takes any strides.
    x = _randn(2, 72, 40).transpose(1, 2)
    layer = _layer(72, 2 * 75 if geglu else 75, bias)
    outputs = 75
    res = _randn(2, 40, outputs, seed=2) if residual else None
    got = linear(x, layer.weight, layer.bias, res, geglu)
    assert got.shape == (2, 40, outputs) and got.is_contiguous()
    expected = linear_reference(x, layer.weight, layer.bias, res, geglu)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("geglu", [False, True], ids=["linear", "geglu"])
def test_weights_are_read_where_they_lie_with_their_strides(geglu):
    """No packed copy: a transposed weight's view, and the rows of a stack of weights (as
    `stacked_linear` makes), read in place."""
    x = _randn(2, 9, 24)
    stack = _randn(96, 24, seed=3)
    weight, bias = stack[32:96], _randn(64, seed=4)  # rows of a stack
    transposed = weight.t().contiguous().t()  # [N, K] with K-major strides
    expected = linear_reference(x, weight, bias, geglu=geglu)
    for w in (weight, transposed):
        torch.testing.assert_close(linear(x, w, bias, geglu=geglu), expected, atol=1e-4, rtol=1e-4)


def test_linear_reads_a_token_map_at_the_step_a_step_index_names():
    """A captured sparse step projects a cached token map: step 1 of a [steps, B, L, D]
    buffer, addressed through a step index in device memory."""
    buffer, layer = _randn(3, 2, 64, 20), _layer(20, 40)
    view = StepView(buffer, torch.tensor([1], device=DEVICE))
    got = linear(view, layer.weight, layer.bias)
    torch.testing.assert_close(got, layer(buffer[1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("geglu", [False, True], ids=["linear", "geglu"])
def test_rows_go_into_the_given_rows_of_a_token_map_at_the_step(geglu):
    """Active tokens' keys and values written into a step's cached token map: the named
    rows of step 1 change, every other row and step stays."""
    layer = _layer(20, 2 * 24 if geglu else 24)
    buffer = _randn(3, 2, 70, 24, seed=5)
    before = buffer.clone()
    index = torch.tensor([0, 3, 4, 9, 40, 69], device=DEVICE)
    x = _randn(2, 6, 20, seed=6)
    view = StepView(buffer, torch.tensor([1], device=DEVICE))
    assert linear(x, layer.weight, layer.bias, geglu=geglu, out=view, out_index=index) is view
    expected = before.clone()
    expected[1][:, index] = linear_reference(x, layer.weight, layer.bias, geglu=geglu)
    torch.testing.assert_close(buffer, expected, atol=1e-4, rtol=1e-4)
    untouched = torch.ones(70, dtype=torch.bool, device=DEVICE)
    untouched[index] = False
    assert torch.equal(buffer[1][:, untouched], before[1][:, untouched])
    assert torch.equal(buffer[[0, 2]], before[[0, 2]])
    with pytest.raises(ValueError, match=r"out_index must be \[6\]"):
        linear(x, layer.weight, layer.bias, geglu=geglu, out=view, out_index=index[:5])


def test_no_rows_give_no_rows_and_bad_shapes_are_refused():
    layer = _layer(20, 12)
    assert linear(_randn(2, 0, 20), layer.weight, layer.bias).shape == (2, 0, 12)
    with pytest.raises(ValueError, match=r"weight must be \[N, 16\], got \(12, 20\)"):
        linear(_randn(2, 3, 16), layer.weight, layer.bias)
    with pytest.raises(ValueError, match=r"residual must be \(2, 3, 12\)"):
        linear(_randn(2, 3, 20), layer.weight, layer.bias, residual=_randn(2, 3, 6))
    with pytest.raises(ValueError, match="even number of features"):
        linear(_randn(2, 3, 20), _layer(20, 13).weight, geglu=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_gpu_matches_reference():
    x = torch.randn(2, 300, 320, device="cuda", dtype=torch.half)
    layer = _layer(320, 2560).half()
    got = linear(x, layer.weight, layer.bias, geglu=True)
    expected = linear_reference(x, layer.weight, layer.bias, geglu=True)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
