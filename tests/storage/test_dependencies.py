import subprocess
import sys


def test_storage_imports_neither_ray_nor_torch():
    code = "import sys, fisedit.storage; print(sorted({'ray', 'torch'} & set(sys.modules)))"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == "[]"
