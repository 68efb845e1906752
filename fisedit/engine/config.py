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

    # Forbidden extras: a config naming a dropped option (cached_group_norm) fails loudly.
    model_config = ConfigDict(frozen=True, extra="forbid")

    block_size: int = Field(2, ge=1, description="Side of the output blocks a layer computes.")
    dense_below: int = Field(
        16, ge=1, description="Layers whose feature map side is below this run dense."
    )
    active_only_attention: bool = Field(
        False, description="Self-attention keys and values from active tokens only."
    )
    kernels: Literal["auto", "triton", "reference", "dense"] = Field(
        "auto",
        description="Fused Triton kernels or their PyTorch references; auto: Triton on CUDA. "
        "dense: each layer computed whole, the cached maps pasted outside the region (the "
        "slow reference of what the sparse layers compute).",
    )

    @classmethod
    def exact(cls, **overrides) -> "SparseConfig":
        """Every approximation off: a full mask reproduces the dense pass."""
        return cls(active_only_attention=False, **overrides)


class EditConfig(BaseModel):
    """How an edit finds its region and composes its final image."""

    model_config = ConfigDict(frozen=True)

    mask_steps: int = Field(10, ge=1, description="Dense steps that capture the edited region (k).")
    preserve_background: bool = Field(
        True, description="Keep pixels outside the dilated mask identical to the previous image."
    )
    seam_dilation: int = Field(8, ge=0, description="Image pixels the mask grows before blending.")
    seam_feather: int = Field(4, ge=0, description="Width in image pixels of the blended seam.")


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
