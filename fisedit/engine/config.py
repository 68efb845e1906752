"""Configuration of the engine and validated request parameters."""

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, model_validator

# CLIP's tokenizer reads every run of whitespace as one space, so these change nothing.
_WHITESPACE_TO_SPACE = str.maketrans(dict.fromkeys("\t\n\r\v\f", " "))


def _plain_text(text: str) -> str:
    """Tabs and line breaks become spaces; other control characters (NUL, escape codes) are
    refused rather than stored in recipes and reports, where they would mean nothing."""
    text = text.translate(_WHITESPACE_TO_SPACE)
    for position, char in enumerate(text):
        if unicodedata.category(char) == "Cc":
            raise ValueError(
                f"prompt contains the control character {char!r} at position {position}; "
                "prompts take printable text (tabs and line breaks become spaces)"
            )
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("prompt must contain text, not only whitespace")
    return text


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=2000),
    AfterValidator(_plain_text),
    AfterValidator(_not_blank),
]
NegativePrompt = Annotated[str, Field(max_length=2000), AfterValidator(_plain_text)]

SchedulerName = Literal["ddim", "dpm++", "euler"]
DType = Literal["float32", "float16", "bfloat16"]


class SparseConfig(BaseModel):
    """How sparse steps recompute the edited region and which approximations they use."""

    # Forbidden extras: a config naming a dropped option (cached_group_norm) fails loudly.
    model_config = ConfigDict(frozen=True, extra="forbid")

    block_size: int = Field(
        2,
        ge=1,
        description="Side of the output blocks a layer computes. An even side makes them "
        "whole GroupNorm statistics blocks, so a transformer reads its input at active pixels "
        "only and the resnet before it records no output (SD 1.5: a 21% smaller cache).",
    )
    dense_below: int = Field(
        16,
        ge=1,
        description="Layers whose feature map side is below this run dense in sparse steps, "
        "and record nothing, since no sparse step reads their maps.",
    )
    active_only_attention: bool = Field(
        False, description="Self-attention keys and values from active tokens only."
    )
    cached_keys_values: bool = Field(
        False,
        description="Record each self-attention's keys and values, not its input, so that "
        "sparse steps project the active tokens' only and read the others' from the cache: "
        "the same result for fewer MACs and bytes per sparse step, and a larger cache (SD "
        "1.x and 2.x: 27% more per step; SDXL: 45%). A cache is edited with the setting it "
        "was recorded with. Not with active_only_attention, which reads no cached keys.",
    )
    bucketed: bool = Field(
        True,
        description="Pad each layer's active pixels up to a size bucket (repeating one of "
        "them), so edits with similar masks share compiled kernels and captured graphs. "
        "Not with active_only_attention, whose keys are the active tokens themselves.",
    )
    split_k_partials: float = Field(
        1.0,
        ge=0,
        description="Most bytes a Triton sparse conv's split-K partial sums may move "
        "(written, then read), as a fraction of the conv's weight bytes. Splitting the K "
        "loop fills a GPU when few pixels are active; its partial sums are the cost. 0 "
        "never splits. Lower values move fewer bytes per sparse step; whether they run "
        "slower is for a GPU benchmark to say (`fisedit bench --split-k-partials`).",
    )
    kernels: Literal["auto", "triton", "reference", "dense"] = Field(
        "auto",
        description="Fused Triton kernels or their PyTorch references; auto: Triton on CUDA "
        "(there dense steps normalise channels_last maps with Triton too). dense: each layer "
        "computed whole, the cached maps pasted outside the region (the slow reference of "
        "what the sparse layers compute).",
    )

    @model_validator(mode="after")
    def _keys_from_one_place(self) -> "SparseConfig":
        if self.cached_keys_values and self.active_only_attention:
            raise ValueError(
                "cached_keys_values and active_only_attention exclude each other: "
                "active-only attention reads no cached keys and values"
            )
        return self

    def dense_at(self, hw: tuple[int, int]) -> bool:
        """Whether layers with outputs of size `hw` run dense (`dense_below`): sparse steps
        read none of their maps, so none are recorded."""
        return min(hw) < self.dense_below

    @classmethod
    def exact(cls, **overrides) -> "SparseConfig":
        """Every approximation off: a full mask reproduces the dense pass."""
        return cls(active_only_attention=False, **overrides)


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


class TierConfig(BaseModel):
    """Byte budgets for the session caches of one engine (a SessionPool); None means
    unlimited."""

    device_bytes: int | None = Field(None, ge=0)
    host_bytes: int | None = Field(None, ge=0)


class EngineConfig(BaseModel):
    """Where the engine runs and how it edits."""

    model_config = ConfigDict(frozen=True)

    device: str = "cpu"
    dtype: DType = "float32"
    sparse: SparseConfig = SparseConfig()
    edit: EditConfig = EditConfig()
    progress: bool = Field(True, description="Show progress bars over denoise steps.")
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, capture UNet steps as graphs and replay them: the dense step "
        "once, a sparse step once per edit (see graphs.py).",
    )
    channels_last: bool = Field(
        True,
        description="Run the UNet on NHWC feature maps (and cache them so): the sparse "
        "kernels then gather each active pixel's channels as one contiguous vector.",
    )


class GenerationParams(BaseModel):
    """A request for a fresh generation; an edit reuses everything but the prompt.

    `steps` and `guidance` also take diffusers' names, `num_inference_steps` and
    `guidance_scale`. Fields left None are filled in from the model by `Engine.generate`,
    and a session keeps the filled-in values, so its recipe recomputes the same images.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(
        50, ge=2, le=1000, validation_alias=AliasChoices("steps", "num_inference_steps")
    )
    guidance: float = Field(
        7.5, ge=1.0, le=30.0, validation_alias=AliasChoices("guidance", "guidance_scale")
    )
    scheduler: SchedulerName | None = Field(
        None, description="None: the checkpoint's own scheduler if supported, else dpm++."
    )
    height: int | None = Field(
        None, ge=1, le=8192, description="Image height in pixels; None: the model's size."
    )
    width: int | None = Field(
        None, ge=1, le=8192, description="Image width in pixels; None: the model's size."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data):
        if isinstance(data, dict):
            for name, alias in (("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
                if name in data and alias in data:
                    raise ValueError(f"give {name} or its alias {alias}, not both")
        return data


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
                f"mask_steps: {mask_steps} must be smaller than the session's "
                f"steps ({steps}) so that sparse steps remain"
            )
        if not has_mask and mask_steps == 0:
            raise ValueError("mask_steps: capturing the edited region needs at least 1, or a mask")
        return params
