"""Start a Dask scheduler here and GPU workers as SLURM jobs (dask-jobqueue).

Usage: ``python cluster/slurm_gpu.py --jobs 4`` then, in another shell,
``dagpre run workflows/night.yaml --scheduler <the printed address>``. Ctrl-C stops it all.
Needs ``pip install dask-jobqueue`` and dagpre with its ``gpu`` extra on the compute nodes.
"""

import argparse
import time

from dask_jobqueue import SLURMCluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="worker jobs (one GPU each)")
    parser.add_argument("--partition", default="gpu")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="04:00:00")
    args = parser.parse_args()
    cluster = SLURMCluster(
        queue=args.partition,
        account=args.account,
        cores=8,
        processes=1,
        memory="64GB",
        walltime=args.walltime,
        job_extra_directives=["--gres=gpu:1"],
        # one dask-cuda worker per job, RMM pool, spilling at 80 % of GPU memory
        worker_command="dask cuda worker",
        worker_extra_args=["--rmm-pool-size", "24GB", "--device-memory-limit", "0.8"],
        scheduler_options={"dashboard_address": ":8787"},
    )
    cluster.scale(jobs=args.jobs)
    print(cluster.job_script())
    print(f"scheduler: {cluster.scheduler_address}")
    print(f"dashboard: {cluster.dashboard_link}")
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
