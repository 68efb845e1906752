import subprocess
import sys


def test_storage_imports_neither_ray_nor_torch():
    code = "import sys, fisedit.storage; print(sorted({'ray', 'torch'} & set(sys.modules)))"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == "[]"


def test_only_the_s3_store_needs_boto3(tmp_path):
    code = (
        "import sys\n"
        "sys.modules.update(dict.fromkeys(['boto3', 'botocore']))  # not installed\n"
        "from fisedit.storage import open_store\n"
        f"store = open_store({str(tmp_path)!r})\n"
        "store.put('a/b', b'x')\n"
        "print(store.get('a/b'))\n"
        "open_store('s3://bucket/prefix')\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )

    assert result.stdout.strip() == "b'x'"
    assert result.stderr.strip().endswith(
        "ModuleNotFoundError: import of boto3 halted; None in sys.modules"
    )
