"""`fisedit` command line: try the service or the engine (demo), keep an editable session in
a directory (generate, edit, history), benchmark edits against dense diffusers (bench),
run the Ray service on a cluster (up, down, submit), bulk-edit datasets (bulk) and serve
the HTTP API on this machine (serve).

Every command checks its options, and the session directory and mask file it is given,
before it loads a model, so bad input fails at once.
"""

import argparse
import fcntl
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from fisedit.engine.config import (
    DType,
    EditConfig,
    EditParams,
    GenerationParams,
    SparseConfig,
)
from fisedit.storage import StorageError

DEMO_PROMPTS = [
    "a photo of a cat sitting on a wooden bench in a park",
    "a photo of a dog sitting on a wooden bench in a park",
    "a photo of a dog sitting on a red bench in a park",
    "a photo of a dog sitting on a red bench in a park at night",
]
TINY_MODEL_NAMES = ("tiny", "tiny-sd2", "tiny-sdxl")
"""fisedit.engine.models.TINY_MODELS, named here so that options are checked without torch."""
SESSION_FILE = "session.json"
STORE_DIR = "store"
"""The session directory's local object store, which holds the newest version's snapshot."""
# `fisedit bench` defaults, (full, --tiny): the tiny run is a CPU smoke run under a minute on
# two cores, with room for the k=10 case.
BENCH_STEPS = (50, 12)
BENCH_REPEATS = (10, 3)


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here")


def _load_engine(model: str, device: str, dtype: str):
    """The engine, once the input is known to be good; loading takes minutes on a real model."""
    from fisedit.engine.config import EngineConfig
    from fisedit.engine.session import Engine

    _log(f"loading model {model} on {device} in {dtype}")
    _quiet_libraries()
    # Engine.from_pretrained builds the tiny models (tiny, tiny-sd2, tiny-sdxl) itself.
    return Engine.from_pretrained(model, EngineConfig(device=device, dtype=dtype))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UsageError(ValueError):
    """An option, the session directory or a file named by an option is not usable."""


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _options(model: type[BaseModel], **values) -> BaseModel:
    """`model` validated from options named like its fields; errors name the options."""
    try:
        return model(**values)
    except ValidationError as error:
        raise UsageError(_describe(error, _option)) from None


def _describe(error: ValidationError, name=lambda field: field) -> str:
    """The problems on one line, without pydantic's documentation URL."""
    problems = []
    for problem in error.errors(include_url=False):
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        value = problem["input"]
        if problem["type"] != "missing" and not isinstance(value, dict | list):
            message += f" (got {value!r:.80})"
        problems.append(f"{name(field)}: {message}")
    return "; ".join(problems)


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)
    print(f"wrote {path}")


def _save_edit(out: Path, version, edit: EditConfig) -> None:
    """edit_<n>.png and mask_<n>.png: the recomputed region in red, the blended seam (the rest
    of the pixels that may differ) in yellow."""
    from fisedit.engine.images import blend_weight, preview_edit

    image, mask = version.image, version.mask
    weight = blend_weight(mask, image.shape[:2], edit.seam_dilation, edit.seam_feather)
    _save_png(out / f"edit_{version.number}.png", image)
    _save_png(out / f"mask_{version.number}.png", preview_edit(image, mask, weight))


def demo(args: argparse.Namespace) -> None:
    """Runs the service end to end on this machine: a local Ray with two edit workers, a
    local directory store and the tiny model; submits a job that generates a base image and
    edits it three times, and writes the images, region previews and report.json (each
    edit's figures and the cache path the service took). With --engine-only the engine runs
    alone in this process and the report adds each edit's fidelity to masked-dense."""
    _options(
        GenerationParams,
        prompt=DEMO_PROMPTS[0],
        seed=args.seed,
        steps=args.steps,
        scheduler=args.scheduler,
    )
    _check_device(args.device)
    if args.engine_only:
        _engine_demo(args)
    else:
        from fisedit.service.commands import demo as service_demo

        _quiet_libraries()
        service_demo(args, DEMO_PROMPTS)


def _engine_demo(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = _load_engine(args.model, args.device, args.dtype)
    from fisedit.engine.images import psnr

    session = engine.generate(
        DEMO_PROMPTS[0], seed=args.seed, steps=args.steps, scheduler=args.scheduler
    )
    _save_png(out / "base.png", session.image)
    edits = []
    for number, prompt in enumerate(DEMO_PROMPTS[1:], start=1):
        previous = session.image
        masked_dense = session.reference_edit(prompt).image
        version = session.edit(prompt)
        _save_edit(out, version, engine.config.edit)
        report = version.report
        edits.append(
            {
                "prompt": prompt,
                "mask_ratio": report.mask_ratio,
                "region_ratio": report.region_ratio,
                "changed_pixel_ratio": report.changed_pixel_ratio,
                "mac_fraction": report.mac_fraction,
                "sparse_step_mac_fraction": report.sparse_step_mac_fraction,
                "latency_s": report.total_latency_s,
                "fidelity": {
                    "psnr_vs_masked_dense_db": psnr(version.image, masked_dense),
                    "psnr_vs_previous_db": psnr(version.image, previous),
                },
                "report": report.model_dump(),
            }
        )
        print(
            f"edit {number}: mask {report.mask_ratio:.1%} (recomputed {report.region_ratio:.1%},"
            f" pixels that may differ {report.changed_pixel_ratio:.1%}), "
            f"MACs {report.mac_fraction:.1%} of dense, {report.total_latency_s:.2f} s, "
            f"PSNR vs masked-dense {edits[-1]['fidelity']['psnr_vs_masked_dense_db']:.1f} dB"
        )
    summary = {
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "base": {"prompt": DEMO_PROMPTS[0], "report": session.history[0].report.model_dump()},
        "edits": edits,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'report.json'}")


class RecipeHead(BaseModel):
    """The part of a session recipe checked before the engine is imported; the whole
    recipe (fisedit.engine.recipe.SessionRecipe) is validated once it is."""

    model_config = ConfigDict(extra="allow")

    params: GenerationParams


class ReportHead(BaseModel):
    """The part of a version's report that `history` shows (the whole EditReport is kept)."""

    model_config = ConfigDict(extra="allow")

    version: int
    base_version: int | None
    prompt: str
    mask_ratio: float
    changed_pixel_ratio: float
    mac_fraction: float
    total_latency_s: float


class SessionFile(BaseModel):
    """session.json: the model, what is needed to check an edit before loading it, the
    recipe that recomputes the session, and every version's report."""

    model: str
    """The model as `generate` was given it; a directory's absolute path."""
    dtype: DType = "float32"
    """The engine's dtype at `generate` (its snapshots restore only in it)."""
    latent_size: tuple[int, int]
    vae_scale_factor: int
    recipe: RecipeHead
    versions: list[ReportHead]
    """Each version's EditReport, oldest first."""


def _read_session(directory: Path) -> SessionFile:
    path = directory / SESSION_FILE
    if not path.is_file():
        raise UsageError(
            f"{path} not found: {directory} is not a session directory; "
            f"run `fisedit generate --out {directory}` first"
        )
    try:
        saved = SessionFile.model_validate_json(path.read_text())
    except ValidationError as error:
        raise UsageError(f"{path} is not a fisedit session: {_describe(error)}") from None
    return saved


def _write_session(directory: Path, model: str, session) -> None:
    """Writes session.json in one step, so a reader never sees half of it."""
    from fisedit.engine.recipe import recipe_of

    engine_model = session.engine.model
    saved = SessionFile(
        model=model,
        dtype=session.engine.config.dtype,
        latent_size=engine_model.latent_shape[1:],
        vae_scale_factor=engine_model.vae_scale_factor,
        recipe=recipe_of(session).model_dump(mode="json"),
        versions=[v.report.model_dump() for v in session.history],
    )
    path = directory / SESSION_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(saved.model_dump_json(indent=2))
    os.replace(partial, path)
    print(f"wrote {path}")


def _store(directory: Path):
    from fisedit.storage import LocalConfig, LocalObjectStore

    return LocalObjectStore(LocalConfig(root=directory / STORE_DIR))


def _keep_newest_snapshot(directory: Path, model: str, session) -> None:
    """Snapshots the session's current version, records it in session.json, then deletes the
    snapshots of earlier versions (their images, masks and reports stay in the new one)."""
    from fisedit.engine.snapshot import delete_snapshot, snapshot, snapshot_versions

    store = _store(directory)
    for version in snapshot_versions(store, session.id):
        if version >= session.version:  # left by a command interrupted after its snapshot
            delete_snapshot(store, session.id, version)
    snapshot(session, store)
    _write_session(directory, model, session)
    for version in snapshot_versions(store, session.id):
        if version < session.version:
            delete_snapshot(store, session.id, version)


def _open_session(engine, directory: Path, saved: SessionFile):
    """The session at its newest version: restored from its snapshot, or rebuilt from the
    recipe (and snapshotted again) when the snapshot is missing or damaged."""
    from fisedit.engine.recipe import SessionRecipe, rebuild
    from fisedit.engine.snapshot import SnapshotError, restore

    recipe = SessionRecipe.model_validate(saved.recipe.model_dump(mode="json"))
    version, start = recipe.version, time.perf_counter()
    try:
        session = restore(engine, _store(directory), recipe.session_id, version)
    except SnapshotError as error:
        _log(
            f"cannot restore version {version} from {directory / STORE_DIR}: {error}; "
            f"rebuilding it from the recipe (the generation and {version} edits)"
        )
        session = rebuild(engine, recipe)
        _keep_newest_snapshot(directory, saved.model, session)
        return session
    _log(f"restored version {version} from its snapshot in {time.perf_counter() - start:.2f} s")
    return session


@contextmanager
def _only_command_on(directory: Path) -> Iterator[None]:
    """Holds the session directory's lock: a second edit of it at the same time would
    restore the same version and delete the snapshot the first one writes."""
    if not (directory / SESSION_FILE).is_file():
        yield  # _read_session says what is wrong
        return
    with open(directory / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another fisedit command is editing {directory}") from None
        yield


def generate(args: argparse.Namespace) -> None:
    """Generates a base image and starts a session in --out: base.png, session.json (the
    recipe and reports) and the snapshot of the newest version under store/."""
    params = _options(
        GenerationParams,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
    )
    out = Path(args.out)
    if (out / SESSION_FILE).exists():
        raise UsageError(f"{out} already holds a session; choose another --out or remove it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    _check_device(args.device)
    # A model directory by its absolute path, so that edits run from anywhere find it; the
    # tiny models by name, which load_model takes before any directory of that name.
    model = args.model
    if model not in TINY_MODEL_NAMES and Path(model).is_dir():
        model = str(Path(model).resolve())
    out.mkdir(parents=True, exist_ok=True)
    engine = _load_engine(model, args.device, args.dtype)
    session = engine.generate(**params.model_dump())
    _save_png(out / "base.png", session.image)
    _keep_newest_snapshot(out, model, session)


def edit(args: argparse.Namespace) -> None:
    """Applies one more edit to a session written by `fisedit generate`: to its newest
    version, or with --from-version to an older one, which makes a branch beside the later
    versions (they stay in the history).

    The newest version is restored from the snapshot in the session directory, or rebuilt
    from session.json when the snapshot is missing or damaged. Only the new version's
    snapshot is kept: earlier versions' snapshots are deleted to save disk (their images,
    masks and reports stay), so an older version is recomputed from the generation first.
    A prompt that encodes like the extended version's makes no version.
    """
    directory = Path(args.session)
    with _only_command_on(directory):
        _edit(args, directory)


def _edit(args: argparse.Namespace, directory: Path) -> None:
    saved = _read_session(directory)
    steps, has_mask = saved.recipe.params.steps, args.mask is not None
    try:
        params = EditParams.for_session(args.prompt, args.mask_steps, has_mask, steps, EditConfig())
    except ValidationError as error:
        raise UsageError(_describe(error, _option)) from None
    newest = len(saved.versions) - 1
    source = newest if args.from_version is None else args.from_version
    if not 0 <= source <= newest:
        raise UsageError(f"--from-version: the session's versions are 0 to {newest} (got {source})")
    mask = None
    if args.mask is not None:
        from fisedit.engine.masks import load_mask

        mask = load_mask(args.mask, saved.latent_size, saved.vae_scale_factor)
    _check_device(args.device)
    # The session's own dtype unless another is asked for: its snapshot restores only in it.
    engine = _load_engine(saved.model, args.device, args.dtype or saved.dtype)
    session = _open_session(engine, directory, saved)
    if source != session.version and session.makes_new_version(params.prompt, extends=source):
        edits = _edits_to(saved, source)
        _log(
            f"version {source} keeps no snapshot (only the newest version does): "
            "recomputing it first, from the generation"
            + (f" and {edits} edit{'s' * (edits > 1)}" if edits else "")
        )
    version = session.edit(params.prompt, mask=mask, mask_steps=params.mask_steps, extends=source)
    if version.number <= newest:
        _log(f"no new version: the session stays at version {session.version}")
        return
    _save_edit(directory, version, engine.config.edit)
    _keep_newest_snapshot(directory, saved.model, session)
    print(json.dumps(version.report.model_dump(), indent=2))


def _edits_to(saved: SessionFile, version: int) -> int:
    """How many edits made `version`, from the generation on."""
    edits = 0
    while (parent := saved.versions[version].base_version) is not None:
        edits, version = edits + 1, parent
    return edits


def history(args: argparse.Namespace) -> None:
    """Lists a session's versions: the version each was edited from (its parent), prompt,
    mask and changed-pixel ratios, MAC fraction (of a dense generation) and latency. Reads
    session.json only; loads no model."""
    saved = _read_session(Path(args.session))
    if args.json:
        print(json.dumps([report.model_dump() for report in saved.versions], indent=2))
        return
    print(
        f"{'version':>7}  {'parent':>6}  {'mask':>6}  {'pixels':>6}  {'MACs':>6}  "
        f"{'latency':>8}  prompt"
    )
    for report in saved.versions:
        parent = report.base_version
        mask = "-" if parent is None else f"{report.mask_ratio:.1%}"
        print(
            f"{report.version:>7}  {'-' if parent is None else parent:>6}  {mask:>6}  "
            f"{report.changed_pixel_ratio:>6.1%}  {report.mac_fraction:>6.1%}  "
            f"{report.total_latency_s:>6.2f} s  {report.prompt}"
        )


def bench(args: argparse.Namespace) -> None:
    """Benchmarks dense eager, dense compiled and FISEdit edits side by side, printing each
    case as it finishes. Every timing is a median over repeats (on CPU the end-to-end runs
    are repeated too) shown with its spread; a case whose spread hides the differences
    between cases is flagged NOISY."""
    if args.steps is not None:
        _options(GenerationParams, prompt="bench", steps=args.steps)
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats: must be at least 1 (got {args.repeats})")
    sparse = _options(
        SparseConfig,
        kernels=args.kernels,
        cached_keys_values=args.cached_keys_values,
        split_k_partials=args.split_k_partials,
    )
    compare = tuple(_compared_sparse(sparse, options) for options in args.compare_sparse)
    _check_device(args.device)
    import torch

    from fisedit.bench.edit_bench import MODELS, run_benchmark
    from fisedit.engine.config import EngineConfig
    from fisedit.engine.model_shapes import UNET_SHAPES

    models = ("tiny",) if args.tiny else tuple(args.models.split(",") if args.models else MODELS)
    unknown = [name for name in models if name not in UNET_SHAPES and name != "tiny"]
    if unknown:
        raise UsageError(f"--models: unknown {unknown}; known: {', '.join(UNET_SHAPES)}")
    run_benchmark(
        device=args.device,
        models=models,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        steps=args.steps or BENCH_STEPS[args.tiny],
        compile=args.compile,
        repeats=args.repeats or BENCH_REPEATS[args.tiny],
        out=Path(args.out),
        engine_config=EngineConfig(
            sparse=sparse,
            channels_last=args.channels_last,
            cuda_graphs=args.cuda_graphs,
        ),
        compare=compare,
    )


def _compared_sparse(sparse: SparseConfig, options: str) -> SparseConfig:
    """`sparse` with the comma-separated `field=value` options of --compare-sparse."""
    pairs = [option.partition("=") for option in options.split(",")]
    if any(not key or not sep or not value for key, sep, value in pairs):
        raise UsageError(f"--compare-sparse: expected field=value[,field=value], got {options!r}")
    try:
        return SparseConfig(**{**sparse.model_dump(), **{k: v for k, _, v in pairs}})
    except ValidationError as error:
        raise UsageError(f"--compare-sparse {options}: {_describe(error)}") from None


def _bounds(model: type[BaseModel], field: str) -> str:
    """An integer or float pydantic field's inclusive range, e.g. "2 to 1000"."""
    low = high = None
    for constraint in model.model_fields[field].metadata:
        low = getattr(constraint, "ge", low)
        high = getattr(constraint, "le", high)
        if getattr(constraint, "lt", None) is not None:  # only integer fields use lt
            high = constraint.lt - 1
    return f"{low} to {high}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisedit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=inspect.cleandoc(function.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(function=function)
        return sub

    def placement(sub: argparse.ArgumentParser, device: str = "cpu") -> None:
        sub.add_argument(
            "--device", default=device, help="torch device, e.g. cpu, cuda (default: %(default)s)"
        )

    def engine_options(sub: argparse.ArgumentParser, dtype: str | None = "float32") -> None:
        placement(sub)
        shown = dtype or "the session's"
        sub.add_argument(
            "--dtype",
            default=dtype,
            choices=["float32", "float16", "bfloat16"],
            help=f"weights and activations (default: {shown})",
        )

    def sampling(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--model",
            default="tiny",
            help="diffusers directory or hub id available offline; tiny, tiny-sd2, tiny-sdxl "
            "build a small random model locally (default: %(default)s)",
        )
        sub.add_argument(
            "--seed",
            type=int,
            default=0,
            help=f"seed of the initial noise, {_bounds(GenerationParams, 'seed')} "
            "(default: %(default)s)",
        )
        sub.add_argument(
            "--steps",
            type=int,
            default=50,
            help=f"denoise steps, {_bounds(GenerationParams, 'steps')}; edits run a fifth of "
            "them dense (default: %(default)s)",
        )
        sub.add_argument(
            "--scheduler",
            default="dpm++",
            choices=["dpm++", "ddim", "euler"],
            help="denoise scheduler (default: %(default)s)",
        )

    prompt_help = "prompt text, not blank, at most 2000 characters (required)"

    sub = command("demo", demo, "run the service locally: a generation and a chain of edits")
    sub.add_argument("--out", required=True, help="directory for images and report.json (required)")
    sub.add_argument(
        "--engine-only",
        action="store_true",
        help="run the engine alone in this process, without Ray (default: the service)",
    )
    sampling(sub)
    engine_options(sub)

    sub = command("generate", generate, "generate a base image and start a session")
    sub.add_argument("--out", required=True, help="new session directory (required)")
    sub.add_argument("--prompt", required=True, help=prompt_help)
    sub.add_argument(
        "--negative-prompt",
        default="",
        help="what to steer away from, at most 2000 characters (default: none)",
    )
    sub.add_argument(
        "--guidance",
        type=float,
        default=7.5,
        help=f"classifier-free guidance scale, {_bounds(GenerationParams, 'guidance')} "
        "(default: %(default)s)",
    )
    sampling(sub)
    engine_options(sub)

    sub = command("edit", edit, "edit a session's newest version, or an older one")
    sub.add_argument(
        "--session", required=True, help="directory written by `fisedit generate` (required)"
    )
    sub.add_argument("--prompt", required=True, help=prompt_help)
    sub.add_argument(
        "--mask",
        help="region to edit, a PNG at latent or image size, white where to edit; replaces "
        "the captured region and skips the dense capture steps (default: none)",
    )
    sub.add_argument(
        "--mask-steps",
        type=int,
        default=None,
        help="dense steps before the sparse ones (k), 0 to the session's steps - 1; without "
        "--mask they capture the edited region (default: a fifth of the session's steps, "
        "0 with --mask)",
    )
    sub.add_argument(
        "--from-version",
        type=int,
        default=None,
        help="the version to edit; an older one than the newest makes a branch, recomputed "
        "from the generation first (default: the newest)",
    )
    engine_options(sub, dtype=None)

    sub = command("history", history, "list a session's versions and their reports")
    sub.add_argument(
        "--session", required=True, help="directory written by `fisedit generate` (required)"
    )
    sub.add_argument(
        "--json", action="store_true", help="print the full reports as JSON (default: a table)"
    )

    sub = command("bench", bench, "benchmark edits against dense baselines")
    placement(sub, device="cuda")
    sub.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="weights and activations (default: float16 on CUDA, float32 on CPU)",
    )
    sub.add_argument(
        "--models",
        help="comma-separated model shapes among sd15-512, sd21-768, sdxl-1024 "
        "(default: all three)",
    )
    sub.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny model only, a CPU smoke run (default: off)",
    )
    sub.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoise steps, {_bounds(GenerationParams, 'steps')} "
        f"(default: {BENCH_STEPS[0]}, or {BENCH_STEPS[1]} with --tiny)",
    )
    sub.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run dense torch.compile (default: on GPU only)",
    )
    sub.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per step median, at least 1 "
        f"(default: {BENCH_REPEATS[0]}, or {BENCH_REPEATS[1]} with --tiny)",
    )
    sub.add_argument(
        "--kernels",
        choices=["auto", "triton", "reference"],
        default="auto",
        help="sparse kernels: Triton or the PyTorch reference; auto: Triton on CUDA "
        "(default: %(default)s)",
    )
    sub.add_argument(
        "--cached-keys-values",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="cache self-attention's keys and values, not its input (fewer MACs per sparse "
        "step, a larger cache; default: off)",
    )
    sub.add_argument(
        "--split-k-partials",
        type=float,
        default=SparseConfig.model_fields["split_k_partials"].default,
        metavar="FRACTION",
        help="most bytes a sparse conv's split-K partial sums may move, as a fraction of its "
        "weights' (0: never split; default: %(default)s)",
    )
    sub.add_argument(
        "--compare-sparse",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,...]",
        help="also time the edit at a 15%% mask with these SparseConfig fields changed, side "
        "by side, and profile its sparse step's kernels, e.g. "
        "cached_keys_values=true,split_k_partials=0.25; repeatable (default: none)",
    )
    sub.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run FISEdit's UNet on NHWC feature maps (default: on)",
    )
    sub.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay FISEdit's UNet steps from CUDA graphs (default: on)",
    )
    sub.add_argument(
        "--out",
        default="bench/results",
        help="directory for the JSON and PNG (default: %(default)s)",
    )
    from fisedit.service.commands import add_commands

    add_commands(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _log(f"warning: {message}")


def main(argv: list[str] | None = None) -> None:
    # Before anything imports huggingface_hub, which reads it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        args.function(args)
    except ValidationError as error:
        _log(f"error: {_describe(error)}")
        raise SystemExit(2) from error
    except (ValueError, OSError, StorageError) as error:
        _log(f"error: {error}")
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
