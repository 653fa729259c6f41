"""Model presets, mesh rules and training run configs: the data files of this folder.

The code that finds them is ``minimax_jax.presets`` (it works from a checkout and from the wheel,
which ships this folder as ``minimax_jax/configs/``); this module re-exports it for checkouts, so
``import configs`` keeps working there. ``ModelConfig.preset(name)`` loads a preset.
"""

from minimax_jax.presets import CONFIGS_DIR, list_presets, preset_path

__all__ = ["CONFIGS_DIR", "list_presets", "preset_path"]
