"""Bulk datasets without Ray: reading, validating and grouping records, keys, manifest rows.

Two record formats are accepted, one per row, in JSONL or Parquet:

- ours: ``{"id", "base_prompt", "seed", "variations": [...]}`` with optional ``steps``,
  ``guidance``, ``scheduler``, ``negative_prompt`` and ``chain``; a variation is a prompt or
  ``{"prompt", "mask"}`` where ``mask`` is a store key of a mask PNG;
- InstructPix2Pix captions: ``{"input", "edit", "output"}`` with an optional ``seed``; the
  variation prompt is ``output``.

Records that generate the same base (prompt, seed and sampling parameters) form one group, so
the base is generated once; a chained record is a group of its own, its variations each
editing the previous one.
"""

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from fisedit.engine.config import GenerationParams, Prompt, SchedulerName
from fisedit.storage import validate_key

Status = Literal["ok", "failed"]


class BulkDefaults(BaseModel):
    """Sampling parameters of records that do not set their own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, ge=0, description="Seed of InstructPix2Pix records without one.")
    steps: int = Field(50, ge=2, le=1000)
    guidance: float = Field(7.5, ge=1.0, le=30.0)
    scheduler: SchedulerName = "dpm++"
    negative_prompt: str = Field("", max_length=2000)


def _prompt_or_object(value: Any) -> Any:
    return {"prompt": value} if isinstance(value, str) else value


def _integral(value: Any) -> Any:
    # Parquet written from pandas holds an integer column with a gap as floats (1.0).
    return int(value) if isinstance(value, float) and value.is_integer() else value


Seed = Annotated[int, BeforeValidator(_integral), Field(ge=0, lt=2**63)]
Steps = Annotated[int, BeforeValidator(_integral), Field(ge=2, le=1000)]


class VariationSpec(BaseModel):
    """One variation of a base: its prompt, and optionally the store key of a mask PNG."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    mask: str | None = None

    def model_post_init(self, _context: Any) -> None:
        if self.mask is not None:
            validate_key(self.mask)


class VariationRecord(BaseModel):
    """Our format: a base prompt and seed with its variations."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=200)
    base_prompt: Prompt
    seed: Seed
    variations: list[Annotated[VariationSpec, BeforeValidator(_prompt_or_object)]] = Field(
        min_length=1
    )
    steps: Steps | None = None
    guidance: float | None = Field(None, ge=1.0, le=30.0)
    scheduler: SchedulerName | None = None
    negative_prompt: str | None = Field(None, max_length=2000)
    chain: bool = False


class InstructPix2PixRecord(BaseModel):
    """The InstructPix2Pix caption format: input caption, edit instruction, output caption."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: Prompt
    edit: str = Field("", max_length=2000)
    output: Prompt
    seed: Seed | None = None


class GroupVariation(BaseModel):
    """A variation as its group's worker runs it."""

    id: str
    """Key segment within the group: v<index>-<digest>, the digest of its record's id and
    what it edits (for a chain, every edit up to it)."""
    prompt: str
    mask: str | None = None
    row: int
    """The record of the input it came from (0-based; blank lines of JSON Lines hold none)."""
    record_id: str
    index: int
    """Position in its record's variations (0 for InstructPix2Pix rows)."""
    edit: str = ""
    """The InstructPix2Pix edit instruction, if any."""


class BulkGroup(BaseModel):
    """One base generation and the variations edited from it."""

    id: str
    generation: GenerationParams
    chain: bool = False
    variations: list[GroupVariation]


class ManifestRow(BaseModel):
    """One row of the manifest: a variation, or an input row that could not be read."""

    run: str
    group: str | None = None
    variation: str | None = None
    row: int
    record_id: str | None = None
    variation_index: int | None = None
    base_prompt: str | None = None
    prompt: str | None = None
    edit: str | None = None
    seed: int | None = None
    chain: bool = False
    base_image_key: str | None = None
    image_key: str | None = None
    mask_key: str | None = None
    mask_ratio: float | None = None
    mac_fraction: float | None = None
    latency_s: float | None = None
    base_latency_s: float | None = None
    """Seconds the group's base generation took: what one dense generation costs."""
    worker: str | None = None
    status: Status
    error: str | None = None


class BulkLayout(BaseModel):
    """Where one run's outputs live: tenants/<tenant>/bulk/<run>/..."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    run: str

    @field_validator("tenant", "run")
    @classmethod
    def _one_key_segment(cls, segment: str) -> str:
        if "/" in segment:
            raise ValueError(f"{segment!r} must be one key segment, without '/'")
        return validate_key(segment)

    @property
    def prefix(self) -> str:
        return f"tenants/{self.tenant}/bulk/{self.run}/"

    @property
    def manifest_key(self) -> str:
        return self.prefix + "manifest.parquet"

    def base_key(self, group: str) -> str:
        return f"{self.prefix}{group}/base.png"

    def image_key(self, group: str, variation: str) -> str:
        return f"{self.prefix}{group}/{variation}.png"

    def mask_key(self, group: str, variation: str) -> str:
        return f"{self.prefix}{group}/{variation}.mask.png"

    def row_key(self, group: str, variation: str) -> str:
        """The variation's manifest row as JSON, written last: it marks the variation done."""
        return f"{self.prefix}{group}/{variation}.json"


class ParsedDataset(BaseModel):
    """The groups to run and the rows that failed validation."""

    groups: list[BulkGroup]
    failed: list[ManifestRow]

    @property
    def variations(self) -> int:
        return sum(len(g.variations) for g in self.groups)


def _reason(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors()
    )


def _digest(identity: Any) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _group_id(generation: GenerationParams, chain_record: str | None, producer: str) -> str:
    return "g" + _digest([generation.model_dump(mode="json"), chain_record, producer])[:16]


def _variation_id(group: "BulkGroup", variation: GroupVariation) -> str:
    """Its position in its record, and a digest of its record and what it edits: an input
    changed under a run id gets new keys, so a rerun computes it instead of taking the
    earlier output for it, while the other records' keys stay."""
    edits = [*group.variations, variation] if group.chain else [variation]
    identity = [group.id, variation.record_id, [(v.prompt, v.mask) for v in edits]]
    return f"v{variation.index}-{_digest(identity)[:8]}"


def parse_records(
    records: Iterable[dict[str, Any] | Any],
    run: str,
    defaults: BulkDefaults | None = None,
    producer: str = "",
) -> ParsedDataset:
    """Validates each record, groups the valid ones by base, and reports the others.

    Groups and their variations keep the order of the input, so ids are the same on every
    run over the same input with the same `producer` (what makes the images: see
    `bulk.producer`); a record whose id an earlier record has is a failed row.
    """
    defaults = defaults or BulkDefaults()
    groups: dict[str, BulkGroup] = {}
    failed: list[ManifestRow] = []
    first_rows: dict[str, int] = {}  # of each id of our records
    for row, raw in enumerate(records):
        try:
            group, variations = _read_record(raw, row, defaults, producer, first_rows)
        except (ValidationError, ValueError) as error:
            reason = _reason(error) if isinstance(error, ValidationError) else str(error)
            record_id = raw.get("id") if isinstance(raw, dict) else None
            failed.append(
                ManifestRow(
                    run=run,
                    row=row,
                    record_id=record_id if isinstance(record_id, str) else None,
                    status="failed",
                    error=f"malformed record: {reason}",
                )
            )
            continue
        group = groups.setdefault(group.id, group)
        for variation in variations:
            group.variations.append(
                variation.model_copy(update={"id": _variation_id(group, variation)})
            )
    return ParsedDataset(groups=list(groups.values()), failed=failed)


def _read_record(
    raw: Any, row: int, defaults: BulkDefaults, producer: str, first_rows: dict[str, int]
) -> tuple[BulkGroup, list[GroupVariation]]:
    if isinstance(raw, Exception):
        raise ValueError(str(raw))
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    # Parquet gives every column of every row; a null is a field the record leaves out.
    raw = {name: value for name, value in raw.items() if value is not None}
    if "base_prompt" in raw or "variations" in raw:
        record = VariationRecord.model_validate(raw)
        if record.id in first_rows:
            raise ValueError(f"id: {record.id!r} is the id of row {first_rows[record.id]} too")
        first_rows[record.id] = row
        generation = GenerationParams(
            prompt=record.base_prompt,
            seed=record.seed,
            steps=record.steps or defaults.steps,
            guidance=record.guidance or defaults.guidance,
            scheduler=record.scheduler or defaults.scheduler,
            negative_prompt=record.negative_prompt or defaults.negative_prompt,
        )
        variations = [
            GroupVariation(
                id="", prompt=v.prompt, mask=v.mask, row=row, record_id=record.id, index=i
            )
            for i, v in enumerate(record.variations)
        ]
        chain = record.id if record.chain else None
    elif {"input", "output"} & raw.keys():
        record = InstructPix2PixRecord.model_validate(raw)
        generation = GenerationParams(
            prompt=record.input,
            seed=defaults.seed if record.seed is None else record.seed,
            steps=defaults.steps,
            guidance=defaults.guidance,
            scheduler=defaults.scheduler,
            negative_prompt=defaults.negative_prompt,
        )
        variation = GroupVariation(
            id="", prompt=record.output, row=row, record_id=f"row{row}", index=0, edit=record.edit
        )
        variations, chain = [variation], None
    else:
        raise ValueError(
            "neither format: expected base_prompt and variations (ours) or input and "
            f"output (InstructPix2Pix), got fields {sorted(raw)}"
        )
    group = BulkGroup(
        id=_group_id(generation, chain, producer),
        generation=generation,
        chain=chain is not None,
        variations=[],
    )
    return group, variations


def variation_row(
    layout: BulkLayout, group: BulkGroup, variation: GroupVariation, **result: Any
) -> ManifestRow:
    """The manifest row of a variation; `result` holds what running it produced."""
    return ManifestRow(
        run=layout.run,
        group=group.id,
        variation=variation.id,
        row=variation.row,
        record_id=variation.record_id,
        variation_index=variation.index,
        base_prompt=group.generation.prompt,
        prompt=variation.prompt,
        edit=variation.edit or None,
        seed=group.generation.seed,
        chain=group.chain,
        base_image_key=layout.base_key(group.id),
        **result,
    )


def ordered(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """Rows in input order: by input row, then by position within the record."""
    return sorted(rows, key=lambda r: (r.row, r.variation_index or 0))


def read_json_records(text: str) -> Iterator[Any]:
    """Records of a JSON Lines text, or of a JSON array; a line that is not JSON becomes a
    ValueError, which parse_records reports as that row's failure. Lines end at newlines
    only: JSON may hold U+2028 and the like unescaped. Blank lines hold no record."""
    text = text.removeprefix("\ufeff")  # a byte order mark, as some editors write
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON array of records ({error})") from None
        yield from records
        return
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as error:
            yield ValueError(f"line is not JSON ({error.msg})")


def input_format(path: str) -> Literal["jsonl", "parquet"]:
    """The input's format, from its name: .jsonl/.ndjson/.json (JSON Lines or a JSON array)
    or .parquet."""
    suffix = Path(urlsplit(path).path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: unknown input format {suffix!r}; expected .jsonl or .parquet")
