"""Lightning attention op (standalone: imports nothing from minimax_jax). See `api.py`."""

from pallas_kernels.lightning.api import (
    IMPLEMENTATIONS,
    LightningConfig,
    interpret_mode,
    lightning_attention,
    lightning_decode,
    resolve_implementation,
    set_interpret,
)
from pallas_kernels.lightning.sharded import lightning_attention_seq_sharded

__all__ = [
    "IMPLEMENTATIONS",
    "LightningConfig",
    "interpret_mode",
    "lightning_attention",
    "lightning_attention_seq_sharded",
    "lightning_decode",
    "resolve_implementation",
    "set_interpret",
]
