"""Multi-host start-up: N processes (one per host, or per GPU) joined through `jax.distributed`.

NOTE: every process builds the same engine: it reads the checkpoint, keeps only
its own shards, and compiles the same executables over one global mesh. Process 0
(the lead) runs the HTTP server and the scheduler; the others (followers) wait for
the inputs of each step, which the lead broadcasts, and execute it with it
(engine.runner). Collectives between processes go through NCCL on GPUs and gloo
on CPUs (which is how the tests run two processes on one machine).

    pagedjax serve --tp 2 --num-processes 2 --process-id 0 --coordinator-address host0:1234   # host 0
    pagedjax serve --tp 2 --num-processes 2 --process-id 1 --coordinator-address host0:1234   # host 1
"""

import jax


class DistributedError(ValueError):
    """Multi-host settings that cannot work; the message says which and why."""


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join the N processes of a run (a no-op for one process). Call before anything touches a device."""
    if num_processes is None or num_processes == 1:
        return
    if num_processes < 1:
        raise DistributedError(f"num_processes must be >= 1 (got {num_processes})")
    if not coordinator_address:
        raise DistributedError(
            f"num_processes={num_processes} needs coordinator_address (host:port of process 0, the same on every process)"
        )
    if process_id is None or not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id must be in 0..{num_processes - 1} (got {process_id})")
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise DistributedError(
                f"jax.distributed is already initialized as process {jax.process_index()} of {jax.process_count()}"
            )
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo over TCP
    # jax's preemption service would take SIGTERM for itself; the server drains and exits on it.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except RuntimeError as e:
        raise DistributedError(
            f"cannot join {num_processes} processes at {coordinator_address} as process {process_id}: {e} "
            "(jax.distributed must start before any device is used)"
        ) from e


def is_lead() -> bool:
    """Whether this process runs the scheduler (process 0, or the only process)."""
    return jax.process_index() == 0
