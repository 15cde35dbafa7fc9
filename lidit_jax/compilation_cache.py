"""JAX's persistent compilation cache, on for a scope, caching every program compiled in it."""
import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

# JAX's defaults skip programs that compile in under 1 s and, on some filesystems, small ones;
# a restart should compile none of what its first start compiled.
_CACHE_EVERY_PROGRAM = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


@contextlib.contextmanager
def persistent_cache(directory):
    """Within it, JAX's persistent compilation cache in `directory` (a local path or gs://).

    Process 0 writes the entries (JAX's rule); every process reads them. After it, JAX's cache
    settings are as they were: a process that goes on (a notebook, the tests) must not write
    every program it compiles later there too (one closing over an LLM's weights writes hundreds
    of MB).
    """
    settings = {"jax_compilation_cache_dir": os.fspath(directory), **_CACHE_EVERY_PROGRAM}
    before = {name: getattr(jax.config, name) for name in settings}
    jax_cache.reset_cache()  # JAX reads the directory once, at the first compile after a reset.
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()
