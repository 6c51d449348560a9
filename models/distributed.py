"""torch.distributed helpers: identity sharding and gathering the latent table onto every rank.

Each rank owns a contiguous block of identities (``owned_identities``) and only samples those, so only
its own latent rows receive gradients; the table is never all-reduced during training (DDP averages the
shared networks' gradients only). A checkpoint gathers each rank's rows (``gather_owned_rows``).

Multi-node runs use the same code: ``torchrun --nnodes M --nproc_per_node K --rdzv_backend c10d
--rdzv_endpoint HOST:PORT train.py ...`` on every node; ranks are numbered globally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not running under torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """True when the environment of a torchrun worker is present (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def owned_range(n_identities: int, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open identity block [lo, hi) owned by ``rank``.

    Example: ``owned_range(10, 1, 3) == (4, 7)`` (blocks of 4, 3, 3).
    """
    if n_identities < world_size:
        raise ValueError(f"{world_size} ranks need at least {world_size} identities, the dataset has "
                         f"{n_identities}; use fewer processes.")
    base, extra = divmod(n_identities, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def owned_identities(n_identities: int, rank: int, world_size: int) -> list[int]:
    """Identities this rank trains: ``list(range(*owned_range(...)))``."""
    lo, hi = owned_range(n_identities, rank, world_size)
    return list(range(lo, hi))


def gather_owned_rows(table: torch.Tensor) -> torch.Tensor:
    """Assemble the full (n, dim) table from each rank's own rows; a no-op without torch.distributed.

    Collective: every rank must call it. Each rank contributes only its block (padded to equal size).
    """
    rank, world_size = world()
    if world_size == 1:
        return table.detach().clone()
    n = table.shape[0]
    blocks = [owned_range(n, r, world_size) for r in range(world_size)]
    longest = max(hi - lo for lo, hi in blocks)
    lo, hi = blocks[rank]
    mine = torch.zeros((longest, *table.shape[1:]), dtype=table.dtype, device=table.device)
    mine[: hi - lo] = table.detach()[lo:hi]
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine)
    return torch.cat([part[: b_hi - b_lo] for part, (b_lo, b_hi) in zip(parts, blocks, strict=True)])


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (stop/skip decisions must be collective)."""
    _, world_size = world()
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
