"""Offline bulk editing of prompt-variation datasets with Ray Data.

Each group (one base generation and its variations, see bulk_records) goes to a GroupEditor
actor, which loads the engine once, generates the base once, and runs every variation as a
sparse edit of the base's cache: independent variations each edit a fork of the base, a chain
edits one session in turn. Images, masks and each variation's manifest row go to the store
under tenants/<tenant>/bulk/<run>/<group>/, create-only; the row is written last and marks the
variation done, so re-running a run computes only what is missing, and the manifest Parquet
written at the end is the same as after an uninterrupted run. Ids name what made each output
(the model, the engine's settings, the base, the variation's edits), so a record or setting
changed between attempts gets new keys and is computed again.
"""

import argparse
import contextlib
import io
import json
import os
import time
import typing
import warnings
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray.data import ActorPoolStrategy
from tqdm.auto import tqdm

from fisedit.engine.session import EditSession, Engine, NoChangeWarning
from fisedit.service.bulk_records import (
    BulkDefaults,
    BulkGroup,
    BulkLayout,
    GroupVariation,
    ManifestRow,
    input_format,
    ordered,
    parse_records,
    read_json_records,
    variation_row,
)
from fisedit.service.config import ServiceConfig, StoreConfig
from fisedit.service.deploy import warn_if_no_room, warn_if_unoffered
from fisedit.storage import ObjectExistsError, ObjectStore


def _arrow_type(annotation: Any) -> pa.DataType:
    kinds = set(typing.get_args(annotation)) or {annotation}
    for kind, arrow in ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64())):
        if kind in kinds:
            return arrow
    return pa.string()


# Explicit, so that columns that are all null in one run keep their types.
MANIFEST_SCHEMA = pa.schema(
    [(name, _arrow_type(field.annotation)) for name, field in ManifestRow.model_fields.items()]
)


class BulkOptions(BaseModel):
    """One bulk run: its id, how many actors run it, and defaults for the records."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str = Field(min_length=1, description="Run id: the key segment of its outputs.")
    workers: int = Field(
        1, ge=1, description="GroupEditor actors, each reserving the config's worker_resources."
    )
    actor_num_cpus: float | None = Field(
        None, gt=0, description="CPUs per actor; None: the config's worker_resources.num_cpus."
    )
    defaults: BulkDefaults = BulkDefaults()
    max_groups: int | None = Field(
        None, ge=1, description="Run at most this many of the missing groups, then stop."
    )
    dense_samples: int = Field(
        3, ge=1, description="Base generations the dense-time estimate is measured on."
    )
    progress: bool = True


class BulkSummary(BaseModel):
    """What a run did and what the same work would have cost as dense generations."""

    run: str
    manifest_key: str
    groups: int
    variations: int
    succeeded: int
    failed: int
    resumed: int
    """Variations already done by an earlier attempt of this run, not recomputed."""
    computed: int
    """Variations edited by this attempt."""
    remaining: int
    """Variations left for a later attempt (when max_groups stopped this one early)."""
    base_generations: dict[str, int]
    """Base generations per group in this attempt."""
    wall_s: float
    edits_per_s: float
    mean_mask_ratio: float | None
    mean_mac_fraction: float | None
    work_s: float
    """Seconds the actors spent: base generations plus edits, in this attempt."""
    dense_estimate_s: float
    """The same attempt as dense generations: bases plus one dense generation per variation,
    each timed as the mean of the first `dense_samples` base generations."""

    def describe(self) -> str:
        def mean(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        saving = self.dense_estimate_s / self.work_s if self.work_s else float("nan")
        return (
            f"run {self.run}: {self.groups} groups, {self.variations} manifest rows "
            f"({self.succeeded} ok, {self.failed} failed; {self.computed} computed, "
            f"{self.resumed} resumed, {self.remaining} remaining)\n"
            f"wall {self.wall_s:.1f} s, {self.edits_per_s:.2f} edits/s, "
            f"mean mask ratio {mean(self.mean_mask_ratio)}, "
            f"mean MAC fraction {mean(self.mean_mac_fraction)}\n"
            f"worker time {self.work_s:.1f} s; as dense generations ~{self.dense_estimate_s:.1f} s "
            f"({saving:.2f}x)\nmanifest: {self.manifest_key}"
        )


def load_engine(config: ServiceConfig) -> Engine:
    """The configured model on the configured device (Engine.from_pretrained builds the tiny
    ones locally)."""
    return Engine.from_pretrained(config.model, config.engine)


def s3_filesystem(store: StoreConfig) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem at the store's endpoint; credentials from the AWS_* variables."""
    options: dict[str, Any] = {"region": store.region or os.environ.get("AWS_DEFAULT_REGION")}
    if store.endpoint_url:
        endpoint = urlsplit(store.endpoint_url)
        options |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme or "https"}
    return pafs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})


def read_input(path: str, store: StoreConfig) -> list[Any]:
    """The records of a JSON Lines, JSON or Parquet file at a local path or s3:// URL."""
    kind = input_format(path)
    if path.startswith("s3://"):
        filesystem, location = s3_filesystem(store), path.removeprefix("s3://")
    else:
        filesystem, location = pafs.LocalFileSystem(), os.path.abspath(path)
    if kind == "parquet":
        return pq.read_table(location, filesystem=filesystem).to_pylist()
    with filesystem.open_input_stream(location) as stream:
        return list(read_json_records(stream.read().decode("utf-8")))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _put_once(store: ObjectStore, key: str, data: bytes) -> None:
    # Outputs are deterministic: an object already there was written by an earlier attempt.
    with contextlib.suppress(ObjectExistsError):
        store.put(key, data, create_only=True)


class GroupEditor:
    """Ray Data actor: loads the engine once, then runs whole groups, one per batch row."""

    def __init__(self, config_json: str, run: str) -> None:
        self.config = ServiceConfig.model_validate_json(config_json)
        self.engine = load_engine(self.config)
        self.store = self.config.store.open()
        self.layout = BulkLayout(tenant=self.config.tenant, run=run)
        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        self.worker = actor or f"pid{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, generations = [], []
        for group_json, todo_json in zip(batch["group"], batch["todo"], strict=True):
            group = BulkGroup.model_validate_json(group_json)
            results, generated = self.run_group(group, set(json.loads(todo_json)))
            rows += [r.model_dump_json() for r in results]
            generations += [generated] * len(results)
        return {"row": np.array(rows, dtype=object), "base_generations": np.array(generations)}

    def run_group(self, group: BulkGroup, todo: set[str]) -> tuple[list[ManifestRow], int]:
        """Generates the base once and edits the variations in `todo` from it; returns their
        rows and the number of base generations (1). A variation that fails, or whose base
        does, is a failed row (not stored: a rerun tries it again); the others go on."""
        layout, generation = self.layout, group.generation
        result: dict[str, Any] = {"worker": self.worker}
        failure = None
        try:
            start = time.perf_counter()
            base = self.engine.generate(**generation.model_dump())
            result["base_latency_s"] = time.perf_counter() - start
            _put_once(self.store, layout.base_key(group.id), _png(base.image))
        except Exception as error:
            failure = f"the base generation failed: {type(error).__name__}: {error}"
        rows = []
        for variation in group.variations:
            if not group.chain and variation.id not in todo:
                continue
            try:
                if failure is not None:
                    raise RuntimeError(failure)
                # A chain edits one session in turn (its done variations too, to get to the
                # next one); independent variations each edit a fork of the base.
                session = base if group.chain else base.fork()
                row = self._edit(session, group, variation, result, stored=variation.id in todo)
            except Exception as error:
                if group.chain and failure is None:
                    failure = f"an earlier edit of the chain failed ({variation.id})"
                row = variation_row(
                    layout, group, variation, status="failed",
                    error=f"{type(error).__name__}: {error}", **result,
                )  # fmt: skip
            if variation.id in todo:
                rows.append(row)
        return rows, 1

    def _edit(
        self,
        session: EditSession,
        group: BulkGroup,
        variation: GroupVariation,
        result: dict[str, Any],
        stored: bool,
    ) -> ManifestRow:
        """Edits `session` to the variation; its row, with its outputs stored if `stored`.
        A prompt that changes nothing (the same text embeddings) gives the image it edits,
        an empty mask and no work done."""
        mask = None if variation.mask is None else self._mask(variation.mask)
        before = session.current
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoChangeWarning)  # the row says so
            version = session.edit(variation.prompt, mask=mask)
        latency = time.perf_counter() - start
        changed = version is not before
        row = variation_row(
            self.layout,
            group,
            variation,
            image_key=self.layout.image_key(group.id, variation.id),
            mask_key=self.layout.mask_key(group.id, variation.id),
            mask_ratio=version.report.mask_ratio if changed else 0.0,
            mac_fraction=version.report.mac_fraction if changed else 0.0,
            latency_s=latency,
            status="ok",
            **result,
        )
        if stored:
            height, width = version.image.shape[:2]
            region = np.zeros((height, width), dtype=np.uint8)
            if changed:
                mask_image = Image.fromarray(version.mask.numpy().astype(np.uint8) * 255)
                region = np.array(mask_image.resize((width, height), Image.NEAREST))
            _put_once(self.store, row.image_key, _png(version.image))
            _put_once(self.store, row.mask_key, _png(region))
            # Last: once the row is there, the variation is done.
            row_key = self.layout.row_key(row.group, row.variation)
            _put_once(self.store, row_key, row.model_dump_json().encode())
        return row

    def _mask(self, key: str) -> np.ndarray:
        return np.array(Image.open(io.BytesIO(self.store.get(key))).convert("L"))


def _manifest_bytes(rows: Iterable[ManifestRow]) -> bytes:
    table = pa.Table.from_pylist([r.model_dump() for r in rows], schema=MANIFEST_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_manifest(store: ObjectStore, layout: BulkLayout) -> list[ManifestRow]:
    """The rows of a run's manifest."""
    table = pq.read_table(io.BytesIO(store.get(layout.manifest_key)))
    return [ManifestRow.model_validate(row) for row in table.to_pylist()]


def _done_rows(
    store: ObjectStore, layout: BulkLayout, groups: list[BulkGroup]
) -> dict[tuple[str, str], ManifestRow]:
    """Variations of `groups` an earlier attempt of the run finished, by (group, variation),
    their rows saying where in today's input they are. Rows stored for inputs that have
    changed since have other ids, and are left out."""
    wanted = {layout.row_key(g.id, v.id): (g, v) for g in groups for v in g.variations}
    done = {}
    for key in store.list(layout.prefix):
        if key in wanted:
            group, variation = wanted[key]
            stored = ManifestRow.model_validate_json(store.get(key))
            # The outputs' fields from then, the input's from now (records may have moved).
            input_fields = variation_row(layout, group, variation, status=stored.status)
            done[group.id, variation.id] = stored.model_copy(
                update=input_fields.model_dump(exclude_unset=True)
            )
    return done


def producer(config: ServiceConfig) -> str:
    """What makes a run's images, for its ids: the model and the engine's settings. A rerun
    with others (another model, mask_steps, dtype) gets new ids, so it recomputes."""
    engine = config.engine.model_dump(mode="json", exclude={"progress"})
    return json.dumps([config.model, engine], sort_keys=True)


def _actor_resources(config: ServiceConfig, options: BulkOptions) -> dict[str, Any]:
    """What each actor reserves: the config's worker resources (a GPU on GPU clusters, a
    custom slot on CPU ones), with `actor_num_cpus` in place of its CPUs if set."""
    reserved = config.worker_resources
    resources: dict[str, Any] = {
        "num_cpus": reserved.num_cpus if options.actor_num_cpus is None else options.actor_num_cpus,
        "num_gpus": reserved.num_gpus,
    }
    if reserved.resources:
        resources["resources"] = dict(reserved.resources)
    return resources


def run_bulk(
    input_path: str, config: ServiceConfig, options: BulkOptions, address: str | None = None
) -> BulkSummary:
    """Runs (or resumes) a bulk run over the dataset at `input_path` and writes its manifest.
    It runs on the connected Ray cluster, else connects to `address` (by default a running
    one, else a new local one) once the input has been read and there is work to do."""
    started = time.perf_counter()
    layout = BulkLayout(tenant=config.tenant, run=options.run)
    store = config.store.open()
    records = read_input(input_path, config.store)
    dataset = parse_records(records, options.run, options.defaults, producer(config))
    done = _done_rows(store, layout, dataset.groups)
    todo_groups = []
    for group in dataset.groups:
        todo = [v.id for v in group.variations if (group.id, v.id) not in done]
        if todo:
            todo_groups.append((group, todo))
    limit = options.max_groups or len(todo_groups)
    remaining = sum(len(todo) for _, todo in todo_groups[limit:])
    todo_groups = todo_groups[:limit]

    computed: list[ManifestRow] = []
    base_generations: dict[str, int] = {}
    if todo_groups:
        if not ray.is_initialized():
            ray.init(address=address)
        resources = _actor_resources(config, options)
        actors = min(options.workers, len(todo_groups))
        warn_if_unoffered(resources, "the GroupEditor actors")
        warn_if_no_room(resources, actors, "GroupEditor actors")
        items = [{"group": g.model_dump_json(), "todo": json.dumps(t)} for g, t in todo_groups]
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            GroupEditor,
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"config_json": config.model_dump_json(), "run": options.run},
            **resources,
        )
        total = sum(len(t) for _, t in todo_groups)
        with tqdm(total=total, desc=f"bulk {options.run}", disable=not options.progress) as bar:
            for result in results.iter_rows():
                row = ManifestRow.model_validate_json(result["row"])
                base_generations[row.group] = int(result["base_generations"])
                computed.append(row)
                bar.update()

    rows = ordered([*done.values(), *computed, *dataset.failed])
    store.put(layout.manifest_key, _manifest_bytes(rows))
    return _summary(
        options,
        layout,
        dataset.groups,
        rows,
        computed,
        base_generations,
        len(done),
        remaining,
        time.perf_counter() - started,
    )


def _summary(
    options: BulkOptions,
    layout: BulkLayout,
    groups: list[BulkGroup],
    rows: list[ManifestRow],
    computed: list[ManifestRow],
    base_generations: dict[str, int],
    resumed: int,
    remaining: int,
    wall_s: float,
) -> BulkSummary:
    ok = [r for r in rows if r.status == "ok"]
    base_latency = {r.group: r.base_latency_s for r in computed if r.base_latency_s is not None}
    samples = list(base_latency.values())[: options.dense_samples]
    dense_generation_s = sum(samples) / len(samples) if samples else 0.0
    edits = [r for r in computed if r.status == "ok"]
    work_s = sum(base_latency.values()) + sum(r.latency_s for r in edits)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return BulkSummary(
        run=options.run,
        manifest_key=layout.manifest_key,
        groups=len(groups),
        variations=len(rows),
        succeeded=len(ok),
        failed=len(rows) - len(ok),
        resumed=resumed,
        computed=len(computed),
        remaining=remaining,
        base_generations=base_generations,
        wall_s=wall_s,
        edits_per_s=len(edits) / wall_s if wall_s else 0.0,
        mean_mask_ratio=mean([r.mask_ratio for r in ok]),
        mean_mac_fraction=mean([r.mac_fraction for r in ok]),
        work_s=work_s,
        dense_estimate_s=sum(base_latency.values()) + dense_generation_s * len(edits),
    )


def bulk_settings(args: argparse.Namespace) -> tuple[ServiceConfig, BulkOptions]:
    """The service config (from --config, with the flags' overrides) and the run's options."""
    config = ServiceConfig.from_yaml(args.config) if args.config else ServiceConfig()
    # As plain data, so that the whole config is validated again with the flags' values.
    settings = config.model_dump()
    if args.model:
        settings["model"] = args.model
    for field, value in (("url", args.out), ("endpoint_url", args.endpoint_url)):
        if value:
            settings["store"][field] = value
    if args.mask_steps is not None:
        settings["engine"]["edit"]["mask_steps"] = args.mask_steps
    config = ServiceConfig.model_validate(settings)
    options = BulkOptions(
        run=args.run,
        workers=args.workers,
        actor_num_cpus=args.actor_cpus,
        defaults=BulkDefaults(**({"steps": args.steps} if args.steps is not None else {})),
        max_groups=args.max_groups,
    )
    return config, options


def run_bulk_cli(args: argparse.Namespace) -> BulkSummary:
    """Runs `fisedit bulk` from parsed arguments and prints the summary."""
    config, options = bulk_settings(args)
    summary = run_bulk(args.input, config, options, address=args.address)
    print(summary.describe())
    return summary
