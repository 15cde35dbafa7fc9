"""train/inputs.py: batches put on the devices ahead of the loop; the positions of those taken.

The real input pipeline (shapes data, conftest's tiny LLM encoding online) over conftest's 8 CPU
devices, as the train loop builds it.
"""
import time

import jax
import numpy as np
import pytest

from configs import demo_shapes
from lidit_jax.parallel import mesh as mesh_lib
from lidit_jax.train.inputs import TrainInputs, abstract_batch, random_batch


def _inputs(tiny_llm, tmp_path, device_prefetch):
    config = demo_shapes.get_config()  # Plain prompts: no chat template to fit in 48 tokens.
    config.text.llms.smollm2.path, config.text.llms.smollm2.width = str(tiny_llm), 0
    config.text.cache_dir = ""  # Online encoding: the thread runs the LLM too.
    config.text.max_length = 48
    config.data.shapes_num_records = 64
    config.data.device_prefetch = device_prefetch
    config.train.batch_size = 8
    return TrainInputs(config, str(tmp_path), mesh_lib.build_mesh(config.mesh))


def _assert_same_batch(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _read_position(inputs):
    """The step the data iterator itself has reached (batches read, taken or not)."""
    return inputs.dataset.get_state()["step"]


def test_prefetched_batches_and_positions_are_those_of_the_batches_taken(tiny_llm, tmp_path):
    ahead = _inputs(tiny_llm, tmp_path, device_prefetch=2)
    inline = _inputs(tiny_llm, tmp_path, device_prefetch=0)
    for step in range(1, 4):
        batch = ahead.next_batch()
        assert all(x.is_ready() for x in jax.tree.leaves(batch))  # Waited for in the thread.
        _assert_same_batch(batch, inline.next_batch())
        np.testing.assert_array_equal(ahead.last_record_ids, inline.last_record_ids)
        assert ahead.get_state() == inline.get_state() and ahead.get_state()["step"] == step
        assert ahead.counters() == inline.counters()
    # While the loop holds batch 3, the thread reads batches 4 and 5, and no further.
    deadline = time.monotonic() + 60
    while _read_position(ahead) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert _read_position(ahead) == 5 and ahead.get_state()["step"] == 3

    # A checkpoint's position resumes on batch 4, in a new run or after set_state here.
    saved = ahead.get_state()
    resumed = _inputs(tiny_llm, tmp_path, device_prefetch=2)
    resumed.set_state(saved)
    ahead.set_state(saved)
    fourth = inline.next_batch()
    _assert_same_batch(resumed.next_batch(), fourth)
    _assert_same_batch(ahead.next_batch(), fourth)
    for inputs in (ahead, inline, resumed):
        inputs.close()


class _FailsAt:
    """The data iterator, raising at its `n`-th batch."""

    def __init__(self, dataset, n):
        self.dataset, self.n, self.read = dataset, n, 0

    def __next__(self):
        self.read += 1
        if self.read == self.n:
            raise OSError("shard unreadable")
        return next(self.dataset)

    def get_state(self):
        return self.dataset.get_state()

    def close(self):
        self.dataset.close()


def test_a_failure_in_the_prefetch_thread_is_raised_by_next_batch(tiny_llm, tmp_path):
    inputs = _inputs(tiny_llm, tmp_path, device_prefetch=2)
    inputs.dataset = _FailsAt(inputs.dataset, 3)
    inputs.next_batch()
    inputs.next_batch()
    for _ in range(2):  # Where the batch would have been, and at every later call.
        with pytest.raises(OSError, match="shard unreadable"):
            inputs.next_batch()
    inputs.close()


@pytest.mark.parametrize("cache_dir", ["some/cache", ""])
def test_random_batch_keeps_the_batch_contract(cache_dir):
    """Benchmarks' and tests' batches have abstract_batch's shapes, dtypes and shardings."""
    config = demo_shapes.get_config()
    config.text.cache_dir = cache_dir
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = mesh_lib.build_mesh(config.mesh)
    abstract = abstract_batch(config, mesh, [(576,)], 3, (32, 32))
    batch = random_batch(abstract, seed=1)
    assert jax.tree.structure(batch) == jax.tree.structure(abstract)
    for leaf, spec in zip(jax.tree.leaves(batch), jax.tree.leaves(abstract), strict=True):
        assert (leaf.shape, leaf.dtype, leaf.sharding) == (spec.shape, spec.dtype, spec.sharding)
    mask, prompt = (np.asarray(batch["text"][0][k]) for k in ("mask", "prompt_mask"))
    assert (prompt <= mask).all() and prompt.any(axis=1).all() and not mask.all()
