"""Where a workflow runs: a dask-cuda cluster, a local process cluster, or a scheduler address.

``kind="auto"`` starts a ``LocalCUDACluster`` (one worker per GPU, RMM pool with CuPy's
allocator routed through it, device memory limit and spilling) when a GPU is usable and
dask-cuda is installed, else a process ``LocalCluster``. The scheduler and the dashboard bind
to ``host`` (127.0.0.1 unless configured), so nothing listens beyond this machine by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import dask

from dagpre.types import InputError

__all__ = ["start_client"]


def _security(tls: Mapping[str, str] | None):
    if not tls:
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=tls["ca_file"],
        tls_client_cert=tls["cert"],
        tls_client_key=tls["key"],
        tls_scheduler_cert=tls["cert"],
        tls_scheduler_key=tls["key"],
        tls_worker_cert=tls["cert"],
        tls_worker_key=tls["key"],
        require_encryption=True,
    )


def _use_rmm_for_cupy() -> None:  # runs on each GPU worker
    import cupy
    import rmm
    from rmm.allocators.cupy import rmm_cupy_allocator

    del rmm
    cupy.cuda.set_allocator(rmm_cupy_allocator)


@contextlib.contextmanager
def start_client(config: Mapping[str, Any], address: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for the workflow's ``cluster`` settings (closed on exit).

    Parameters
    ----------
    config : mapping
        The workflow's ``cluster`` section (see :class:`~dagpre.pipeline.workflow.Workflow`).
    address : str, optional
        A scheduler address that overrides the configuration (``dagpre run --scheduler``).
    """
    from distributed import Client

    from dagpre.backend import gpu_available

    kind = "address" if address else config["kind"]
    address = address or config.get("address")
    security = _security(config.get("tls"))
    if kind == "address":
        if not address:
            raise InputError("cluster.address", "kind is 'address' but no address is given")
        with Client(address, security=security) as client:
            yield client
        return
    if kind == "auto":
        has_cuda = False
        if gpu_available():
            import importlib.util

            has_cuda = importlib.util.find_spec("dask_cuda") is not None
        kind = "local_cuda" if has_cuda else "local"
    common = {
        "host": config["host"],
        "dashboard_address": config["dashboard_address"] or ":0",
        "security": security,
        "protocol": "tls://" if security else None,
    }
    common = {k: v for k, v in common.items() if v is not None}
    with dask.config.set(_WORKER_ENVIRON):
        cluster = _local_cluster(kind, config, common)
    with cluster, Client(cluster, security=security) as client:
        if kind == "local_cuda" and config.get("rmm_pool_size"):
            client.run(_use_rmm_for_cupy)
        yield client


#: distributed's nannies give their workers MALLOC_TRIM_THRESHOLD_=65536. Any explicit
#: malloc setting turns off glibc's adaptive mmap threshold, and with that one every large
#: temporary array is a fresh mmap that page-faults on first touch: the steps ran 2x slower
#: in a worker than in a plain process (1024^2 frames: 11.8 s vs 5.9 s). Setting the mmap
#: threshold to 32 MiB (the adaptive threshold's own upper bound) restores the speed
#: (5.8 s) and leaves distributed's trimming alone.
_WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 32 * 2**20}


def _local_cluster(kind: str, config: Mapping[str, Any], common: dict):
    from distributed import LocalCluster

    if kind == "local_cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise InputError(
                "cluster.kind", "local_cuda needs dask-cuda (pip install 'dagpre[gpu]')"
            ) from None
        cluster = LocalCUDACluster(
            n_workers=config.get("n_workers"),
            threads_per_worker=config["threads_per_worker"],
            rmm_pool_size=config.get("rmm_pool_size"),
            device_memory_limit=config.get("device_memory_limit") or 0.8,
            **common,
        )
    else:
        cluster = LocalCluster(
            n_workers=config.get("n_workers") or 2,
            threads_per_worker=config["threads_per_worker"],
            processes=True,
            memory_limit=config.get("memory_limit") or "auto",
            **common,
        )
    return cluster
