"""Where and how this process runs (`Runtime`: the device, the rank among torchrun's processes, the
precision), passed explicitly, never global; `global_any`, whether a flag holds on any rank, by
which all ranks stop, or fail, together; and `has_bf16_matrix_units`, whether bf16 runs natively."""

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
    process_group: bool = False  # launched by torchrun: in its process group, one process or several

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Under DistributedDataParallel: every process launched by torchrun, even one alone."""
        return self.process_group or self.world_size > 1


def global_any(flag: bool, runtime: Runtime) -> bool:
    if not runtime.distributed:
        return flag
    value = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def has_bf16_matrix_units(device: torch.device) -> bool:
    """Tensor cores, or a CPU with AMX or AVX-512 bf16 instructions.

    The CPU probes are private to PyTorch: one that a release lacks counts as "no", so the
    automatic choice falls back to fp32 rather than failing."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        return any(probe() for probe in probes if probe is not None)
    return False
