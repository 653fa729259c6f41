"""Test setup: 8 simulated CPU devices so sharded code runs in CI; fp32 matmuls in full; one XLA
compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# Compiling dominates the CPU time of the suite, and many tests compile the same program again:
# every `train()` and every generation `Engine` jits fresh closures, which JAX's in-memory cache
# cannot match. A persistent cache in a directory of this session (never reused: each run starts
# cold, as CI does) serves a program XLA has already compiled (its key: the HLO, the devices and
# the compile options), here and in the CLI processes the tests start (they inherit the
# environment variable; test_multihost's jobs name their own cache).
_XLA_CACHE = tempfile.mkdtemp(prefix="minimax-jax-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if not _has_gpu():
        skip_gpu = pytest.mark.skip(reason="needs a GPU: runs on the lent GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    if os.environ.get("CI"):
        skip_heavy = pytest.mark.skip(reason="heavy: too slow for 2-core CI, run by hand")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(skip_heavy)
