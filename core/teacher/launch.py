"""The processes of a ``torchrun`` launch, as the teacher-side commands see them.

``distillzoo cache-teacher``, ``generate``, ``score`` and ``reference-cache`` run
unchanged in one process or under ``torchrun --nproc_per_node N``: every rank
loads the model, takes its share of the work by sample (whole batches or cache
shards, dealt round-robin in the order one process would do them, so each is
computed exactly as one process computes it), writes its own part, and rank 0
puts the parts together. :class:`Launch` is what they need of the launch: the
rank, the devices it owns, a barrier and a gather.

Devices: a rank owns ``cuda:LOCAL_RANK`` by default (or its slice of the node's
GPUs when a model is placed across several with ``max_memory``), and the CPU on a
machine without CUDA. The process group is gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from distillzoo.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Launch":
        """This process's place in a torchrun launch (one process of one when not launched by torchrun);
        the process group is started when there are several."""
        env = os.environ
        launch = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", 1)))
        if launch.world > 1 and not torch.distributed.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(launch.gpus()[0])
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            atexit.register(torch.distributed.destroy_process_group)  # whoever starts the group ends it
        return launch

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gpus(self) -> list[int]:
        """The GPU indices this rank owns: the node's GPUs split evenly among its local ranks."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return []
        if count < self.local_world:
            raise ConfigError(f"{self.local_world} ranks on this node but {count} GPU(s): run at most one rank per GPU")
        each = count // self.local_world
        return list(range(self.local_rank * each, (self.local_rank + 1) * each))

    def device(self, requested: str | None = None) -> torch.device:
        """``requested`` (cpu, cuda, cuda:1), else this rank's first GPU, else the CPU."""
        if requested is not None:
            return torch.device(requested)
        gpus = self.gpus()
        return torch.device(f"cuda:{gpus[0]}") if gpus else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj):
        """Every rank's ``obj`` on every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def mine(self, n: int) -> list[int]:
        """Of ``n`` units of work (batches, shards) in the order one process does them, this rank's share."""
        return list(range(self.rank, n, self.world))
