"""One process of the two-process runs of tests/test_distributed.py, started by PyTorch's
launcher:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py JOBS

JOBS is a JSON file: a list of {"config": TrainConfig fields, "crash": [rank, epoch, step]},
run one after the other in one gloo process group (which ``train`` then uses as it is). A job
with "crash" ends that rank's process at once (``os._exit``) after that optimiser step, as a
killed or crashed worker would; the launcher then stops the other rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(path: str) -> None:
    import torch.distributed as dist

    from gradtool.train import TrainConfig, train

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    for job in json.loads(Path(path).read_text()):
        crash = job.get("crash")

        def on_step(epoch, step, model, crash=crash):
            if crash == [rank, epoch, step]:
                os._exit(3)

        config = dict(job["config"], hidden=tuple(job["config"]["hidden"]))
        train(TrainConfig(**config), on_step=on_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
