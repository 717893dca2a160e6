"""Multi-process start-up: one process per host, the same code path as one process.

`initialize` calls `jax.distributed.initialize` only when more than one process is asked
for: explicitly (--coordinator/--num-processes/--process-id), or by the environment of a
SLURM job step with several tasks or a multi-host TPU slice (JAX detects both itself).
A single process does nothing here, so the local mesh is the special case of the global one.
"""

from __future__ import annotations

import argparse
import os

import jax


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process")
    group.add_argument("--coordinator", default="",
                       help="host:port of process 0 (explicit multi-process start)")
    group.add_argument("--num-processes", type=int, default=0)
    group.add_argument("--process-id", type=int, default=-1)


def detected_cluster() -> str:
    """"slurm" / "tpu" when the environment is a multi-process job, else "". A TPU VM slice
    reached by `gcloud ... ssh --worker=all` has no such variable (JAX reads the slice from
    the VM's metadata server): the rendered tpu-vm script sets MOESAIC_DISTRIBUTED=auto."""
    if os.environ.get("MOESAIC_DISTRIBUTED") == "auto":
        return "tpu"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return ""


def initialize(args: argparse.Namespace) -> None:
    """Starts the multi-controller runtime when this job has more than one process."""
    explicit = args.num_processes > 1 or bool(args.coordinator)
    if explicit:
        if not (args.coordinator and args.num_processes > 1
                and 0 <= args.process_id < args.num_processes):
            raise ValueError("a multi-process start needs --coordinator HOST:PORT, "
                             "--num-processes N > 1 and --process-id in [0, N)")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif detected_cluster():
        jax.distributed.initialize()
