import subprocess
import sys


def test_storage_imports_neither_ray_nor_torch():
    code = "import sys, fisedit.storage; print(sorted({'ray', 'torch'} & set(sys.modules)))"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == "[]"


def test_only_the_s3_store_needs_boto3(tmp_path, python_without):
    code = (
        "from fisedit.storage import open_store\n"
        f"store = open_store({str(tmp_path)!r})\n"
        "store.put('a/b', b'x')\n"
        "print(store.get('a/b'))\n"
        "open_store('s3://bucket/prefix')\n"
    )

    result = python_without(["boto3", "botocore"], code, timeout=60)

    assert result.stdout.strip() == "b'x'"
    assert result.stderr.strip().endswith(
        "ModuleNotFoundError: import of boto3 halted; None in sys.modules"
    )
