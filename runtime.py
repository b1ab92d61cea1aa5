"""Where and how this process runs (`Runtime`: the device, the rank among torchrun's processes, the
precision), passed explicitly, never global; and `global_any`, whether a flag holds on any rank, by
which all ranks stop, or fail, together."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """Where and how this process runs: passed explicitly, never global."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None: fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def global_any(flag: bool, runtime: Runtime) -> bool:
    if not runtime.distributed:
        return flag
    value = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
