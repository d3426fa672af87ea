"""Test set-up (before jax is imported): CPU, 8 fake devices for sharding tests, fast compiles.

`--xla_backend_optimization_level=0` skips LLVM's optimisation passes: tests are dominated by
compile time, the generated code stays IEEE-exact (no fast-math), and it halves the suite's time.
"""

import atexit
import os
import shutil
import sys
import tempfile

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + [
    f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for the session: tests that rebuild the same program (trainer resume,
# repeated jits of one model) compile it once. Removed when the session ends (subprocesses of tests inherit it).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="actalker-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(__file__))
# pytest's unraisable-exception hook imports `tracemalloc` on first use. tensorflow-datasets imports its
# dependencies under etils' `lazy_imports`, which swaps `builtins.__import__` for one that returns lazy
# modules; a garbage collection during that import (an object whose __del__ raises) then ran the hook's
# first `import tracemalloc` through the swap, tracemalloc.py's own imports came back lazy, and the hook
# failed ("Failed to process unraisable exception", a spurious test failure). Imported here, the hook
# finds it loaded (tests/test_pipeline.py::test_unraisable_hook_survives_lazy_imports).
import tracemalloc  # noqa: E402, F401


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="session")
def svd_xt_abstract():
    """The SVD-xt UNet under nnx.eval_shape: shapes and metadata only, nothing allocated."""
    from flax import nnx

    from actalker_jax.models.unet import UNetConfig, UNetSpatioTemporalConditionModel

    return nnx.eval_shape(lambda: UNetSpatioTemporalConditionModel(UNetConfig.svd_xt(), rngs=nnx.Rngs(0)))
