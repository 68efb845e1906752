"""Per-step tensors recorded while denoising: the state the next edit reuses."""

import torch


class ActivationCache:
    """One contiguous [steps, ...] tensor per recorded name, indexed by denoise step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, step: int, value: torch.Tensor) -> None:
        buffer = self.tensors.get(name)
        if buffer is None:
            buffer = value.new_empty((self.steps, *value.shape))
            self.tensors[name] = buffer
        buffer[step].copy_(value)

    def get(self, name: str, step: int) -> torch.Tensor:
        try:
            return self.tensors[name][step]
        except KeyError:
            raise KeyError(f"nothing recorded under {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
