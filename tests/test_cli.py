"""The `fisedit` command line, run as a user would, on the tiny model."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def _fisedit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fisedit.cli", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        check=check,
    )


def test_demo_writes_images_masks_and_a_report(tmp_path):
    _fisedit("demo", "--out", str(tmp_path), "--steps", "14")

    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["edits"]) >= 3
    for number, edit in enumerate(report["edits"], start=1):
        for name in (f"edit_{number}.png", f"mask_{number}.png"):
            assert Image.open(tmp_path / name).size == (128, 128)
        assert 0 <= edit["mask_ratio"] <= 1
        assert 0 < edit["mac_fraction"] <= 1
        assert edit["latency_s"] > 0
        assert edit["fidelity"]["psnr_vs_masked_dense_db"] > 30
    assert Image.open(tmp_path / "base.png").size == (128, 128)


def test_generate_then_edit_extends_the_session(tmp_path):
    _fisedit("generate", "--out", str(tmp_path), "--prompt", "a cat", "--steps", "12")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "region.png")

    first = _fisedit("edit", "--session", str(tmp_path), "--prompt", "a dog", "--mask-steps", "4")
    second = _fisedit(
        "edit", "--session", str(tmp_path), "--prompt", "a red dog",
        "--mask", str(tmp_path / "region.png"),
    )  # fmt: skip

    assert json.loads(first.stdout[first.stdout.index("{") :])["version"] == 1
    report = json.loads(second.stdout[second.stdout.index("{") :])
    assert report["version"] == 2 and report["mask_source"] == "user"
    assert report["mask_ratio"] == 64 / 1024
    recipe = json.loads((tmp_path / "session.json").read_text())["recipe"]
    assert [e["params"]["prompt"] for e in recipe["edits"]] == ["a dog", "a red dog"]
    assert recipe["edits"][0]["user_mask"] is None and recipe["edits"][1]["user_mask"]
    assert (tmp_path / "edit_2.png").exists() and (tmp_path / "mask_2.png").exists()


def test_bad_input_exits_with_a_clear_message(tmp_path):
    missing = _fisedit("demo", "--out", str(tmp_path), "--model", "/no/such/model", check=False)
    empty = _fisedit("generate", "--out", str(tmp_path), "--prompt", "", check=False)

    assert missing.returncode == 2 and "cannot load a Stable Diffusion pipeline" in missing.stderr
    assert empty.returncode == 2 and "prompt" in empty.stderr
