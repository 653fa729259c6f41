"""The wheel's packages (everything else is in setup.cfg, which setup.cfg's own syntax cannot say:
``packages = find:`` takes no mapped folders).

The checkout keeps the top-level ``configs/`` (data) and ``convert/`` (converter CLIs) folders;
the wheel installs them under the project's names, ``minimax_jax/configs/`` (found by path by
``minimax_jax.presets``) and ``minimax_jax_convert`` (the console scripts point there; its modules
import one another relatively), so that it installs no generic top-level ``configs`` or
``convert`` package that could clash with another project's.
"""

from setuptools import find_packages, setup

MAPPED = {"minimax_jax.configs": "configs", "minimax_jax_convert": "convert"}

setup(
    packages=[
        *find_packages(
            include=["minimax_jax", "minimax_jax.*", "pallas_kernels", "pallas_kernels.*"]
        ),
        *MAPPED,
    ],
    package_dir=MAPPED,
)
