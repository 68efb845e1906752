"""The `fisedit` command line on the tiny model: through the `main` the installed command runs,
and in a new process where the process matters."""

import argparse
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fisedit.cli import _parser, main
from fisedit.engine.images import REGION_COLOUR, SEAM_COLOUR
from fisedit.engine.models import _quiet_libraries

STEPS = "4"


def _fisedit_process(*args: str, check: bool = True, flags: tuple[str, ...] = (), cwd=None):
    """`fisedit args` in a new Python process: for what depends on the process (what it
    imports, its environment, the locks it takes, a Ray it starts)."""
    return subprocess.run(
        [sys.executable, *flags, "-m", "fisedit.cli", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        check=check,
        cwd=cwd,
    )


def _fisedit(*args: str, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """`fisedit args` run by the command's own `main` in this process, its output captured:
    the code a new process runs, without importing torch and diffusers again (7 of the 10 s
    a command takes on the 2-core machine). The libraries' logging settings and the warning
    display it changes come back afterwards."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.chdir(cwd or os.getcwd()),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        _quiet_libraries(),
        warnings.catch_warnings(),
    ):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    result = subprocess.CompletedProcess(
        ["fisedit", *args], code, stdout.getvalue(), stderr.getvalue()
    )
    if check:
        result.check_returncode()
    return result


def _report(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout[result.stdout.index("{") :])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _snapshots(directory: Path) -> list[str]:
    """The session directory's complete snapshots, as v<n>."""
    return sorted(p.parent.name for p in directory.glob("store/sessions/*/v*/manifest.json"))


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory) -> Path:
    """A session generated once; tests edit copies of it."""
    directory = tmp_path_factory.mktemp("session") / "s"
    _fisedit("generate", "--out", str(directory), "--prompt", "a cat", "--steps", STEPS)
    return directory


def _copy(session_dir: Path, target: Path) -> Path:
    shutil.copytree(session_dir, target)
    return target


def test_demo_runs_an_edit_chain_job_on_a_local_service(tmp_path):
    _fisedit_process("demo", "--out", str(tmp_path), "--steps", STEPS)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["state"] == "succeeded"
    assert [edit["version"] for edit in report["edits"]] == [1, 2, 3]
    # Every follow-up edit reached the worker holding the session's cache.
    assert report["service"]["cache_paths"] == ["hit"] * 3
    assert len(set(report["service"]["workers"])) == 1
    for edit in report["edits"]:
        assert 0 < edit["mac_fraction"] < 1 and edit["latency_s"] > 0
        for name in (f"edit_{edit['version']}.png", f"mask_{edit['version']}.png"):
            assert Image.open(tmp_path / name).size == (128, 128)
    assert Image.open(tmp_path / "base.png").size == (128, 128)
    assert (tmp_path / "store/tenants/local/sessions").is_dir()


def test_engine_demo_writes_images_masks_and_a_report(tmp_path):
    _fisedit("demo", "--engine-only", "--out", str(tmp_path), "--steps", "14")

    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["edits"]) >= 3
    for number, edit in enumerate(report["edits"], start=1):
        for name in (f"edit_{number}.png", f"mask_{number}.png"):
            assert Image.open(tmp_path / name).size == (128, 128)
        assert 0 <= edit["mask_ratio"] <= edit["region_ratio"] <= edit["changed_pixel_ratio"]
        assert 0 < edit["mac_fraction"] <= 1
        assert edit["latency_s"] > 0
        assert edit["fidelity"]["psnr_vs_masked_dense_db"] > 30
    assert Image.open(tmp_path / "base.png").size == (128, 128)


def test_edits_restore_the_newest_snapshot_and_history_lists_the_versions(session_dir, tmp_path):
    directory = _copy(session_dir, tmp_path / "s")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:12, 4:12] = 255  # image pixels 16..47
    Image.fromarray(mask).save(tmp_path / "region.png")

    first = _fisedit("edit", "--session", str(directory), "--prompt", "a dog")
    second = _fisedit(
        "edit", "--session", str(directory), "--prompt", "a red dog",
        "--mask", str(tmp_path / "region.png"),
    )  # fmt: skip
    table = _fisedit("history", "--session", str(directory)).stdout
    reports = json.loads(_fisedit("history", "--session", str(directory), "--json").stdout)

    assert "restored version 0 from its snapshot" in first.stderr
    assert "restored version 1 from its snapshot" in second.stderr
    assert "rebuilding" not in first.stderr + second.stderr
    # k follows the steps: a fifth of 4, at least 1, leaving sparse steps.
    assert (_report(first)["dense_steps"], _report(first)["sparse_steps"]) == (1, 3)
    report = _report(second)
    assert report["version"] == 2 and report["mask_source"] == "user"
    assert report["mask_ratio"] == 64 / 1024
    # The 32 px square and the 8 px seam around it: 48 x 48 pixels may differ.
    assert report["changed_pixel_ratio"] == 48 * 48 / 128**2
    assert _snapshots(directory) == ["v2"]
    recipe = json.loads((directory / "session.json").read_text())["recipe"]
    assert [e["params"]["prompt"] for e in recipe["edits"]] == ["a dog", "a red dog"]
    assert [r["prompt"] for r in reports] == ["a cat", "a dog", "a red dog"]
    assert reports[2] == report
    rows = table.splitlines()[1:]
    assert len(rows) == 3 and rows[2].split()[:4] == ["2", "1", "6.2%", "14.1%"]
    assert rows[0].split()[:3] == ["0", "-", "-"]
    assert rows[2].endswith("a red dog")


def test_a_session_made_from_a_relative_model_path_in_bfloat16_edits_anywhere_as_made(
    tiny_model_dir, tmp_path
):
    model = Path(tiny_model_dir)
    made = ["generate", "--out", str(tmp_path / "s"), "--prompt", "a cat", "--steps", "2"]
    _fisedit(*made, "--model", model.name, "--dtype", "bfloat16", cwd=model.parent)
    edited = _fisedit("edit", "--session", str(tmp_path / "s"), "--prompt", "a dog", cwd=tmp_path)

    saved = json.loads((tmp_path / "s/session.json").read_text())
    assert (saved["model"], saved["dtype"]) == (str(model), "bfloat16")
    assert f"loading model {model} on cpu in bfloat16" in edited.stderr
    assert "restored version 0 from its snapshot" in edited.stderr
    assert _report(edited)["version"] == 1


def test_a_tiny_model_is_saved_by_name_even_beside_a_directory_of_that_name(tmp_path):
    from fisedit.cli import TINY_MODEL_NAMES
    from fisedit.engine.models import TINY_MODELS

    assert set(TINY_MODEL_NAMES) == set(TINY_MODELS)
    _fisedit("generate", "--out", "tiny", "--prompt", "a cat", "--steps", "2", cwd=tmp_path)
    assert json.loads((tmp_path / "tiny/session.json").read_text())["model"] == "tiny"


def test_the_mask_image_shows_the_recomputed_region_and_the_seam(session_dir, tmp_path):
    directory = _copy(session_dir, tmp_path / "s")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "region.png")

    _fisedit(
        "edit", "--session", str(directory), "--prompt", "a dog",
        "--mask", str(tmp_path / "region.png"),
    )  # fmt: skip

    edited = _png(directory / "edit_1.png").astype(np.uint16)
    preview = _png(directory / "mask_1.png")
    region = (edited + REGION_COLOUR) // 2
    seam = (edited + SEAM_COLOUR) // 2
    assert np.array_equal(preview[16:48, 16:48], region[16:48, 16:48])
    assert np.array_equal(preview[8:16, 8:56], seam[8:16, 8:56])  # the seam above it
    assert np.array_equal(preview[56:], edited[56:])  # beyond the seam, the image as is


def test_a_damaged_snapshot_is_rebuilt_from_the_recipe_with_the_same_result(session_dir, tmp_path):
    intact = _copy(session_dir, tmp_path / "intact")
    damaged = _copy(session_dir, tmp_path / "damaged")
    (shard,) = damaged.glob("store/sessions/*/v0/*.safetensors")
    shard.write_bytes(shard.read_bytes()[:-16] + bytes(16))

    restored = _fisedit("edit", "--session", str(intact), "--prompt", "a dog")
    rebuilt = _fisedit("edit", "--session", str(damaged), "--prompt", "a dog")

    assert "corrupted" in rebuilt.stderr and "rebuilding it from the recipe" in rebuilt.stderr
    assert np.array_equal(_png(damaged / "edit_1.png"), _png(intact / "edit_1.png"))
    assert _report(rebuilt)["mask_ratio"] == _report(restored)["mask_ratio"]
    assert _snapshots(damaged) == ["v1"]


def test_an_edit_of_an_older_version_makes_a_branch_beside_the_later_ones(session_dir, tmp_path):
    directory = _copy(session_dir, tmp_path / "s")
    fresh = _copy(session_dir, tmp_path / "fresh")
    _fisedit("edit", "--session", str(directory), "--prompt", "a dog")

    branch = _fisedit(
        "edit", "--session", str(directory), "--prompt", "a fox", "--from-version", "0"
    )
    same = _fisedit("edit", "--session", str(directory), "--prompt", "A cat", "--from-version", "0")
    _fisedit("edit", "--session", str(fresh), "--prompt", "a fox")

    assert "recomputing it first, from the generation\n" in branch.stderr
    report = _report(branch)
    assert (report["version"], report["base_version"]) == (2, 0)
    # The branch is the edit a session at version 0 makes.
    assert np.array_equal(_png(directory / "edit_2.png"), _png(fresh / "edit_1.png"))
    saved = json.loads((directory / "session.json").read_text())
    assert [e["parent"] for e in saved["recipe"]["edits"]] == [0, 0]
    assert [v["base_version"] for v in saved["versions"]] == [None, 0, 0]
    assert _snapshots(directory) == ["v2"]
    # Version 0's prompt again: no version, and nothing recomputed to find that out.
    assert "no new version: the session stays at version 2" in same.stderr
    assert "recomputing" not in same.stderr


def test_an_edit_that_changes_nothing_makes_no_version(session_dir, tmp_path):
    directory = _copy(session_dir, tmp_path / "s")

    result = _fisedit("edit", "--session", str(directory), "--prompt", "A  cat ")

    assert result.returncode == 0
    assert "warning: 'A  cat ' has the same text embeddings as version 0" in result.stderr
    assert "no new version: the session stays at version 0" in result.stderr
    assert not (directory / "edit_1.png").exists() and _snapshots(directory) == ["v0"]
    assert (directory / "session.json").read_text() == (session_dir / "session.json").read_text()


def _blank_png(path: Path, size: int) -> str:
    Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda s, t: ["generate", "--out", str(t / "new"), "--prompt", " "], "--prompt: prompt"),
        (
            lambda s, t: ["generate", "--out", str(t / "new"), "--prompt", "a", "--steps", "1"],
            "--steps: Input should be greater than or equal to 2 (got 1)",
        ),
        (lambda s, t: ["generate", "--out", str(s), "--prompt", "a"], "already holds a session"),
        (
            lambda s, t: ["generate", "--out", str(t / "new"), "--prompt", "a", "--device", "gpu"],
            "--device: Expected one of",
        ),
        (lambda s, t: ["edit", "--session", str(s), "--prompt", ""], "--prompt: String should"),
        (
            lambda s, t: ["edit", "--session", str(s), "--prompt", "a", "--mask-steps", STEPS],
            f"mask_steps: {STEPS} must be smaller than the session's steps ({STEPS})",
        ),
        (
            lambda s, t: ["edit", "--session", str(t), "--prompt", "a dog"],
            "is not a session directory",
        ),
        (
            lambda s, t: ["edit", "--session", str(s), "--prompt", "a", "--from-version", "1"],
            "--from-version: the session's versions are 0 to 0 (got 1)",
        ),
        (
            lambda s, t: ["edit", "--session", str(s), "--prompt", "a", "--mask", f"{t}/no.png"],
            "mask file not found",
        ),
        (
            lambda s, t: [
                "edit",
                "--session",
                str(s),
                "--prompt",
                "a",
                "--mask",
                _blank_png(t / "empty.png", 128),
            ],
            "the mask is empty",
        ),  # fmt: skip
        (
            lambda s, t: [
                "edit",
                "--session",
                str(s),
                "--prompt",
                "a",
                "--mask",
                _blank_png(t / "odd.png", 100),
            ],
            "mask size (100, 100) matches neither the latent size (32, 32)",
        ),  # fmt: skip
        (
            lambda s, t: ["bench", "--tiny", "--split-k-partials", "-1"],
            "--split-k-partials: Input should be greater than or equal to 0 (got -1.0)",
        ),
        (
            lambda s, t: ["bench", "--tiny", "--compare-sparse", "cached_keys_values"],
            "--compare-sparse: expected field=value[,field=value], got 'cached_keys_values'",
        ),
        (
            lambda s, t: ["bench", "--tiny", "--compare-sparse", "block_size=1,blocks=2"],
            "--compare-sparse block_size=1,blocks=2: blocks: Extra inputs are not permitted",
        ),
    ],
    ids=[
        "blank-prompt",
        "steps",
        "existing-session",
        "device",
        "empty-edit-prompt",
        "mask-steps",
        "not-a-session",
        "from-version",
        "missing-mask",
        "empty-mask",
        "mask-size",
        "split-k-partials",
        "compare-sparse-form",
        "compare-sparse-field",
    ],
)
def test_bad_input_fails_before_the_model_loads(session_dir, tmp_path, make_args, message):
    # -X importtime lists every module the command imports: diffusers, which every model
    # load needs, must not be among them.
    result = _fisedit_process(
        *make_args(session_dir, tmp_path), check=False, flags=("-X", "importtime")
    )

    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert "errors.pydantic.dev" not in result.stderr
    assert "loading model" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if re.search(r"\|\s+diffusers$", line)]


def test_a_second_edit_of_a_session_while_one_runs_is_refused(session_dir, tmp_path):
    directory = _copy(session_dir, tmp_path / "s")
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the running edit holds it
        refused = _fisedit_process(
            "edit", "--session", str(directory), "--prompt", "a dog", check=False
        )

    assert refused.returncode == 2
    assert f"error: another fisedit command is editing {directory}" in refused.stderr
    assert "loading model" not in refused.stderr


def test_history_of_a_damaged_session_file_names_what_is_wrong(session_dir, tmp_path):
    directory = _copy(session_dir, tmp_path / "s")
    saved = json.loads((directory / "session.json").read_text())
    saved["versions"][0].pop("base_version")
    (directory / "session.json").write_text(json.dumps(saved))

    result = _fisedit("history", "--session", str(directory), check=False)

    assert result.returncode == 2, result.stderr
    assert "is not a fisedit session: versions.0.base_version: Field required" in result.stderr


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    result = _fisedit_process(
        "demo", "--out", str(tmp_path), "--model", "/no/such/model", check=False
    )

    assert result.returncode == 2 and "cannot load a Stable Diffusion pipeline" in result.stderr


def test_a_hub_id_is_looked_up_offline_even_when_the_environment_does_not_say_so(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    command = ["generate", "--out", str(tmp_path), "--prompt", "a cat", "--steps", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "fisedit.cli", *command, "--model", "no-such-org/no-such-model"],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip

    assert result.returncode == 2 and "available offline" in result.stderr
    assert "huggingface.co" not in result.stderr  # no request was made


def test_a_bulk_run_into_a_missing_bucket_is_a_clear_error_before_ray_starts(s3_endpoint):
    examples = Path(__file__).parents[1] / "jobs" / "examples" / "variations.jsonl"
    result = _fisedit_process(
        *("bulk", str(examples), "--run", "r1", "--out", "s3://no-such-bucket/runs"),
        *("--endpoint-url", s3_endpoint, "--address", "127.0.0.1:1"),
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist at {s3_endpoint}"
    )


def test_help_lists_every_command_and_every_option_has_a_default_or_is_required():
    top = _fisedit_process("--help").stdout
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    assert set(commands.choices) == {
        *("demo", "generate", "edit", "history", "bench"),
        *("up", "down", "submit", "bulk", "serve"),
    }
    for name, sub in commands.choices.items():
        assert f"    {name} " in top and sub.description, name
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and ("default" in action.help or "required" in action.help), (
                name,
                action.dest,
            )
    bench_steps = next(a for a in commands.choices["bench"]._actions if a.dest == "steps")
    assert "or 12 with --tiny" in bench_steps.help and "2 to 1000" in bench_steps.help
