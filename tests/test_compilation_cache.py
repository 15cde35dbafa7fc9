"""lidit_jax.compilation_cache.persistent_cache: inside, every program is written to the cache,
however quick to compile; after it, JAX's settings are back and nothing more is written."""
import jax
import jax.numpy as jnp

from lidit_jax.compilation_cache import persistent_cache

_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_caches_every_program_inside_and_nothing_after(tmp_path):
    before = {name: getattr(jax.config, name) for name in _SETTINGS}
    with persistent_cache(tmp_path / "cache"):
        jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(5.0)).block_until_ready()
        inside = _entries(tmp_path / "cache")
    assert inside, "a program that compiles in milliseconds is cached too"
    assert {name: getattr(jax.config, name) for name in _SETTINGS} == before
    jax.jit(lambda x: jnp.cos(x) * 5.0)(jnp.arange(7.0)).block_until_ready()
    assert _entries(tmp_path / "cache") == inside


def test_a_second_scope_reads_what_the_first_wrote(tmp_path):
    def program(x):
        return jnp.tanh(x) + 0.25

    events = []

    def record(event, **kwargs):
        events.append(event)

    x = jnp.ones(3)  # Outside the scopes: only `program` compiles inside them.
    with persistent_cache(tmp_path):
        jax.jit(program)(x).block_until_ready()
    written = _entries(tmp_path)
    jax.clear_caches()  # The in-memory caches: the next compile must come from the directory.
    jax.monitoring.register_event_listener(record)
    try:
        with persistent_cache(tmp_path):
            jax.jit(program)(x).block_until_ready()
    finally:
        jax.monitoring.unregister_event_listener(record)
    assert "/jax/compilation_cache/cache_hits" in events
    assert _entries(tmp_path) == written
