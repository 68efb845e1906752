import pytest
import torch

from fisedit.engine.kernels.launch import interpreting, launcher
from fisedit.engine.kernels.tokens import layernorm_rows


def test_the_cpu_suite_runs_kernels_under_the_interpreter():
    assert interpreting() != torch.cuda.is_available()


def test_a_kernel_refuses_tensors_it_cannot_run_on():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        launcher(layernorm_rows, torch.device("meta"))
