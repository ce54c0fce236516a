"""Test helper: the XLA compilations that happen inside a `with` block, by function name."""

import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT


@contextlib.contextmanager
def compilations():
    """Yields a list that collects the name (e.g. 'jit(_decode)') of every backend compilation
    (a cache miss: jit cache hits record nothing) until the block ends."""
    names: list[str] = []

    def listen(event, duration_secs, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
