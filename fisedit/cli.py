"""`fisedit` command line: demo, generate and edit."""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

DEMO_PROMPTS = [
    "a photo of a cat sitting on a wooden bench in a park",
    "a photo of a dog sitting on a wooden bench in a park",
    "a photo of a dog sitting on a red bench in a park",
    "a photo of a dog sitting on a red bench in a park at night",
]


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _engine(model: str, args: argparse.Namespace):
    from fisedit.engine.config import EngineConfig
    from fisedit.engine.session import Engine

    # Engine.from_pretrained builds the tiny models (tiny, tiny-sd2, tiny-sdxl) itself.
    return Engine.from_pretrained(model, EngineConfig(device=args.device, dtype=args.dtype))


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)
    print(f"wrote {path}")


def _save_edit(out: Path, version) -> None:
    from fisedit.engine.masks import overlay_mask

    _save_png(out / f"edit_{version.number}.png", version.image)
    _save_png(out / f"mask_{version.number}.png", overlay_mask(version.image, version.mask))


def demo(args: argparse.Namespace) -> None:
    """Generates a base image and runs a chain of prompt edits, reporting each edit."""
    from fisedit.engine.images import psnr

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = _engine(args.model, args)
    session = engine.generate(
        DEMO_PROMPTS[0], seed=args.seed, steps=args.steps, scheduler=args.scheduler
    )
    _save_png(out / "base.png", session.image)
    edits = []
    for number, prompt in enumerate(DEMO_PROMPTS[1:], start=1):
        previous = session.image
        masked_dense = session.reference_edit(prompt).image
        version = session.edit(prompt)
        _save_edit(out, version)
        report = version.report
        edits.append(
            {
                "prompt": prompt,
                "mask_ratio": report.mask_ratio,
                "region_ratio": report.region_ratio,
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
            f"edit {number}: mask {report.mask_ratio:.1%} (recomputed {report.region_ratio:.1%}), "
            f"MACs {report.mac_fraction:.1%} of "
            f"dense, {report.total_latency_s:.2f} s, "
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


def _write_session(out: Path, model: str, session) -> None:
    from fisedit.engine.recipe import recipe_of

    recipe = recipe_of(session).model_dump(mode="json")
    (out / "session.json").write_text(json.dumps({"model": model, "recipe": recipe}, indent=2))
    print(f"wrote {out / 'session.json'}")


def generate(args: argparse.Namespace) -> None:
    """Generates a base image and writes the session recipe that `fisedit edit` extends."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = _engine(args.model, args).generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
    )
    _save_png(out / "base.png", session.image)
    _write_session(out, args.model, session)


def edit(args: argparse.Namespace) -> None:
    """Applies one more edit to a session written by `fisedit generate`."""
    from fisedit.engine.recipe import SessionRecipe, rebuild

    out = Path(args.session)
    path = out / "session.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `fisedit generate --out {out}` first")
    saved = json.loads(path.read_text())
    recipe = SessionRecipe.model_validate(saved["recipe"])
    engine = _engine(saved["model"], args)
    if recipe.edits:
        print(f"rebuilding the session from its recipe ({len(recipe.edits)} edits)")
    session = rebuild(engine, recipe)
    version = session.edit(args.prompt, mask=args.mask, mask_steps=args.mask_steps)
    _save_edit(out, version)
    _write_session(out, saved["model"], session)
    print(json.dumps(version.report.model_dump(), indent=2))


def bench(args: argparse.Namespace) -> None:
    """Benchmarks dense eager, dense compiled and FISEdit edits side by side."""
    import torch

    from fisedit.bench.edit_bench import MODELS, run_benchmark
    from fisedit.engine.config import EngineConfig, SparseConfig

    models = ("tiny",) if args.tiny else tuple(args.models.split(",") if args.models else MODELS)
    run_benchmark(
        device=args.device,
        models=models,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        steps=args.steps or (20 if args.tiny else 50),
        compile=args.compile,
        repeats=args.repeats,
        out=Path(args.out),
        engine_config=EngineConfig(
            sparse=SparseConfig(kernels=args.kernels),
            channels_last=args.channels_last,
            cuda_graphs=args.cuda_graphs,
        ),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisedit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=function.__doc__)
        sub.set_defaults(function=function)
        sub.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        return sub

    def sampling(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--model",
            default="tiny",
            help="diffusers directory or hub id; tiny, tiny-sd2, tiny-sdxl build a small "
            "random model locally (default: tiny)",
        )
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--steps", type=int, default=50)
        sub.add_argument("--scheduler", default="dpm++", choices=["dpm++", "ddim", "euler"])

    sub = command("demo", demo, "generate a base image and run a chain of edits")
    sub.add_argument("--out", required=True, help="directory for images and report.json")
    sampling(sub)

    sub = command("generate", generate, "generate a base image and start a session")
    sub.add_argument("--out", required=True, help="session directory")
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--negative-prompt", default="")
    sub.add_argument("--guidance", type=float, default=7.5)
    sampling(sub)

    sub = commands.add_parser("bench", help="benchmark edits against dense baselines")
    sub.set_defaults(function=bench)
    sub.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    sub.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    sub.add_argument("--models", help="comma-separated: sd15-512,sd21-768,sdxl-1024 (default)")
    sub.add_argument("--tiny", action="store_true", help="the tiny model only (CPU smoke run)")
    sub.add_argument("--steps", type=int, default=None, help="denoise steps (default 50)")
    sub.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run dense torch.compile (default: on GPU only)",
    )
    sub.add_argument("--repeats", type=int, default=10, help="timed calls per step median")
    sub.add_argument(
        "--kernels",
        choices=["auto", "triton", "reference"],
        default="auto",
        help="sparse kernels: Triton or the PyTorch reference (default: Triton on CUDA)",
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
    sub.add_argument("--out", default="bench/results", help="directory for the JSON and PNG")

    sub = command("edit", edit, "edit the newest version of a session")
    sub.add_argument("--session", required=True, help="directory written by `fisedit generate`")
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--mask", help="mask image (PNG) at latent or image size; skips capture")
    sub.add_argument("--mask-steps", type=int, default=None, help="dense capture steps (k)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    from pydantic import ValidationError

    from fisedit.engine.models import ModelLoadError

    try:
        args.function(args)
    except (ValidationError, ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
