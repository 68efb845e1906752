"""Configuration of the engine and validated request parameters."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("prompt must contain text, not only whitespace")
    return text


Prompt = Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_not_blank)]

SchedulerName = Literal["ddim", "dpm++", "euler"]
DType = Literal["float32", "float16", "bfloat16"]


class SparseConfig(BaseModel):
    """How sparse steps recompute the edited region and which approximations they use."""

    model_config = ConfigDict(frozen=True)

    block_size: int = Field(2, ge=1, description="Side of the output blocks a layer computes.")
    dense_below: int = Field(
        16, ge=1, description="Layers whose feature map side is below this run dense."
    )
    cached_group_norm: bool = Field(
        True, description="Use the GroupNorm statistics recorded in the cached generation."
    )
    active_only_attention: bool = Field(
        False, description="Self-attention keys and values from active tokens only."
    )
    kernels: Literal["auto", "triton", "reference"] = Field(
        "auto", description="Fused Triton kernels or the PyTorch reference; auto: Triton on CUDA."
    )

    @classmethod
    def exact(cls, **overrides) -> "SparseConfig":
        """Every approximation off: a full mask reproduces the dense pass."""
        return cls(cached_group_norm=False, active_only_attention=False, **overrides)


class EditConfig(BaseModel):
    """How an edit finds its region and composes its final image."""

    model_config = ConfigDict(frozen=True)

    mask_steps: int | None = Field(
        None,
        ge=1,
        description="Dense steps that capture the edited region (k); None follows the "
        "session's steps (default_mask_steps: 10 of 50).",
    )
    preserve_background: bool = Field(
        True, description="Keep pixels outside the dilated mask identical to the previous image."
    )
    seam_dilation: int = Field(8, ge=0, description="Image pixels the mask grows before blending.")
    seam_feather: int = Field(4, ge=0, description="Width in image pixels of the blended seam.")

    def mask_steps_for(self, steps: int) -> int:
        """k for a session of `steps` denoise steps."""
        return default_mask_steps(steps) if self.mask_steps is None else self.mask_steps


def default_mask_steps(steps: int) -> int:
    """FISEdit's k: a fifth of the steps (10 of 50), at least 1. Sessions have at least 2
    steps, so at least one sparse step remains."""
    return max(1, steps // 5)


class EngineConfig(BaseModel):
    """Where the engine runs and how it edits."""

    model_config = ConfigDict(frozen=True)

    device: str = "cpu"
    dtype: DType = "float32"
    sparse: SparseConfig = SparseConfig()
    edit: EditConfig = EditConfig()
    progress: bool = Field(True, description="Show progress bars over denoise steps.")
    cuda_graphs: bool = Field(
        True, description="On CUDA, capture each edit's sparse step once and replay it."
    )
    channels_last: bool = Field(
        True,
        description="Run the UNet on NHWC feature maps (and cache them so): the sparse "
        "kernels then gather each active pixel's channels as one contiguous vector.",
    )


class GenerationParams(BaseModel):
    """A request for a fresh generation; an edit reuses everything but the prompt."""

    model_config = ConfigDict(frozen=True)

    prompt: Prompt
    negative_prompt: str = Field("", max_length=2000)
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(50, ge=2, le=1000)
    guidance: float = Field(7.5, ge=1.0, le=30.0)
    scheduler: SchedulerName = "dpm++"


class EditParams(BaseModel):
    """A request to edit a session's current version."""

    model_config = ConfigDict(frozen=True)

    prompt: Prompt
    mask_steps: int = Field(
        10, ge=0, description="Dense steps before the sparse ones; without a mask they find it."
    )

    @classmethod
    def for_session(
        cls, prompt: str, mask_steps: int | None, has_mask: bool, steps: int, edit: EditConfig
    ) -> "EditParams":
        """The request for an edit of a session of `steps` steps, checked against it.

        `mask_steps` defaults to the configured k without a mask and to none with one."""
        if mask_steps is None:
            mask_steps = 0 if has_mask else edit.mask_steps_for(steps)
        params = cls(prompt=prompt, mask_steps=mask_steps)
        if mask_steps >= steps:
            raise ValueError(
                f"mask_steps ({mask_steps}) must be smaller than the session's "
                f"steps ({steps}) so that sparse steps remain"
            )
        if not has_mask and mask_steps == 0:
            raise ValueError("capturing the edited region needs mask_steps >= 1, or a mask")
        return params
