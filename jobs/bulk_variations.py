"""Ray Jobs entrypoint: bulk-edit a prompt-variation dataset (see fisedit.service.bulk).

    ray job submit --working-dir . -- python jobs/bulk_variations.py \
        jobs/examples/variations.jsonl --run example --out s3://bucket/prefix

Re-submitting the same --run resumes it: only missing variations are computed.
"""

import argparse
import os

from fisedit.service.bulk import run_bulk_cli
from fisedit.service.commands import add_bulk_arguments


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bulk_arguments(parser)
    run_bulk_cli(parser.parse_args())


if __name__ == "__main__":
    main()
