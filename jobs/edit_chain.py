"""Ray Jobs entrypoint: runs one edit-chain spec on the cluster's FISEdit service.

    ray job submit --working-dir . -- python jobs/edit_chain.py jobs/examples/chain.json

The service's actors are started first if they are not up (with the config named by
--config, or the embedded defaults); the job's log shows progress and the final record.
"""

import sys

from fisedit.cli import main

if __name__ == "__main__":
    main(["submit", "--start", *sys.argv[1:]])
