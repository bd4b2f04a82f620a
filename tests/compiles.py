"""Counting XLA compilations, to check that serving after warm-up compiles nothing."""

import contextlib

import jax


@contextlib.contextmanager
def recorded_compiles():
    """Yields a list that collects one entry per backend compilation inside the block."""
    compiles: list[str] = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
