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


def any_rank(flag: torch.Tensor) -> bool:
    """True on every rank when the 0-d bool tensor ``flag`` is true on any rank: one all-reduce on the
    tensor's own device and one host read (the only sync it costs).

    >>> any_rank(torch.tensor(False))
    False
    """
    return any_rank_each(flag.reshape(1))[0]


def any_rank_each(flags: torch.Tensor) -> list[bool]:
    """``any_rank`` of each entry of a 1-d bool tensor, for one all-reduce and one host read in all (so a
    step's several collective decisions cost one sync).

    >>> any_rank_each(torch.tensor([False, True]))
    [False, True]
    """
    _, world_size = world()
    values = flags.reshape(-1).to(torch.float32)
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [v > 0 for v in values.tolist()]


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (stop/skip decisions must be collective)."""
    _, world_size = world()
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# Long enough for rank 0 to prepare a dataset cache while the other ranks wait at the first barrier
# (FFHQ at 256 px takes hours on a few cores); prepare the cache before launching to need less.
DEFAULT_TIMEOUT_MINUTES = 12 * 60


def env_rank() -> int:
    """This process's global rank from torchrun's environment (RANK), usable before the process group
    exists; 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


def pin_local_gpu(environ: dict | None = None) -> str | None:
    """Make this rank see only its own GPU: ``CUDA_VISIBLE_DEVICES`` = the LOCAL_RANK-th visible GPU.

    Taichi's CUDA backend always takes device 0 of what it sees, so without this every rank of one node
    would land on GPU 0. It must run before the first CUDA call of the process (``torch.cuda.is_available()``
    included): CUDA reads the variable once. Returns the GPU id now visible, or None outside torchrun.
    Raises ValueError when LOCAL_RANK names more GPUs than ``CUDA_VISIBLE_DEVICES`` lists.

    >>> env = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5"}
    >>> pin_local_gpu(env), env["CUDA_VISIBLE_DEVICES"]
    ('5', '5')
    """
    environ = os.environ if environ is None else environ
    if int(environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in environ:
        return None
    local_rank = int(environ["LOCAL_RANK"])
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        chosen = str(local_rank)
    else:
        ids = [part.strip() for part in listed.split(",") if part.strip()]
        if local_rank >= len(ids):
            raise ValueError(f"local rank {local_rank} needs GPU number {local_rank + 1}, but "
                             f"CUDA_VISIBLE_DEVICES={listed!r} lists {len(ids)}: start at most {len(ids)} "
                             "processes per node (torchrun --nproc_per_node).")
        chosen = ids[local_rank]
    environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for the device the tensors really live on: NCCL for CUDA, gloo else.

    Chosen from the device in use, not from ``torch.cuda.is_available()``: ``--arch cpu`` on a CUDA
    machine keeps its tensors on the CPU, which NCCL cannot reduce.

    >>> process_group_backend(torch.device("cpu"))
    'gloo'
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def start_process_group(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> str:
    """``init_process_group`` with the backend for ``device`` and a timeout that covers rank 0's cache
    preparation at the first barrier; on CUDA also selects the (pinned) GPU. Returns the backend name."""
    from datetime import timedelta

    name = process_group_backend(device)
    if name == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=name, timeout=timedelta(minutes=timeout_minutes))
    return name
