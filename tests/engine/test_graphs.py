import pytest
import torch

from fisedit.engine import EditConfig, Engine, EngineConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_captured_steps_give_the_eager_latents(tiny_model_dir, dtype):
    def run(cuda_graphs: bool):
        config = EngineConfig(
            device="cuda",
            dtype=dtype,
            progress=False,
            cuda_graphs=cuda_graphs,
            edit=EditConfig(mask_steps=3),
        )
        session = Engine.from_pretrained(tiny_model_dir, config).generate("a cat", steps=10)
        base = session.current.cache.tensors["latents"].clone()
        return base, session.edit("a dog")

    (eager_base, eager), (captured_base, captured) = run(False), run(True)

    tolerance = {"atol": 1e-3, "rtol": 1e-3}
    torch.testing.assert_close(captured_base, eager_base, **tolerance)
    assert torch.equal(eager.mask, captured.mask)
    latents = captured.cache.tensors["latents"], eager.cache.tensors["latents"]
    torch.testing.assert_close(*latents, **tolerance)
    assert captured.report.executed_macs == eager.report.executed_macs
    assert captured.report.graph_capture_s > 0 and eager.report.graph_capture_s == 0
