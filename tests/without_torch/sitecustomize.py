"""A Python process with this folder on PYTHONPATH starts as `pip install -e .` leaves it: the
[test] extra's references (torch, diffusers, accelerate) cannot be imported.

The tests' child runs of `python -m lidit_jax.main` use it (`train_helpers.child_env`): a user's
run never has them, and transformers imports PyTorch whenever it can find it, a large part of
every child's start-up for reading a config.json (docs/performance.md, "The test suite"). A
module that needs one of them fails here as it would on a user's machine.
"""
import sys

HIDDEN = ("torch", "diffusers", "accelerate")


class _Hide:
    """An import finder that finds nothing under HIDDEN and defers to `finder` for the rest."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
