"""Ray Jobs entrypoint: bulk-edit a prompt-variation dataset (see fisedit.service.bulk).

    ray job submit --working-dir . -- python jobs/bulk_variations.py \
        jobs/examples/variations.jsonl --run example --out s3://bucket/prefix \
        --config cluster/examples/service-gpu.yaml

The config's worker_resources are what each actor reserves (a GPU there) and its
engine.device where it runs; without --config, the embedded defaults run on CPU.

Re-submitting the same --run resumes it: only missing variations are computed. It takes the
arguments of `fisedit bulk`, and reports bad input as that does.
"""

import sys

from fisedit.cli import main

if __name__ == "__main__":
    main(["bulk", *sys.argv[1:]])
