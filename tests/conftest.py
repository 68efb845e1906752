import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from fisedit.engine.models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny SD 1.5, SD 2 (v-prediction) and SDXL pipelines written with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    return {v: str(build_tiny_model(root / v, v)) for v in ("sd15", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["sd15"]
