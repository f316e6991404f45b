"""One torchrun rank for test_data_ray: reads batches from the shared Ray data plane, writes the sample ids.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ray_rank.py ADDRESS RUN_ID STEPS OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from test_data_loader import make_plan

from thruput.data import Loader


def main() -> None:
    address, run_id, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = make_plan(world_size=world)
    got = []
    with Loader(plan, rank=rank, world_size=world, workers={"address": address, "run_id": run_id, "chunk_docs": 4}) as loader:
        backend = loader.stats()["backend"]
        for batch in loader:
            got.append([list(d) for d in batch["documents"]])
            dist.barrier()  # ranks step together, as in training
            if len(got) == steps:
                break
        state = loader.state_dict()
    states = [None] * world
    dist.all_gather_object(states, state)
    (out / f"rank{rank}.json").write_text(json.dumps({"backend": backend, "documents": got, "same_state": all(s == state for s in states)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
