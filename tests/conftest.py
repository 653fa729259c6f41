"""Test setup: 8 simulated CPU devices so sharded code runs in CI; fp32 matmuls in full."""

import gc
import os

# Two xdist workers (setup.cfg addopts) share the machine: on a GPU neither may take 75% of its
# memory up front, as JAX does by default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compilation caches after each test module. Every XLA:CPU executable keeps its
    own memory mappings; one process running the whole suite reached Linux's default limit of
    65,530 mappings (vm.max_map_count) in the last test files, where the next mmap failed inside
    XLA and the run died with SIGSEGV."""
    yield
    jax.clear_caches()
    gc.collect()
