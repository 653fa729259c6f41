"""Lightning-attention decay rates (slopes), pure numpy.

Two formulas exist for the per-head decay ``s_j`` of lightning layer ``l`` (global layer index,
softmax layers counted) in a model of ``L`` layers with ``N`` heads:

* ``"remote"`` (MiniMax remote code and vLLM; the released checkpoints were trained with it)::

      s_j = alibi(N)_j * (1 - l / (L - 1) + 1e-5)

  where ``alibi(N)_j = 2**(-8 * (j + 1) / N)`` when ``N`` is a power of two, and otherwise the
  ALiBi interleaving ``alibi(cp) + alibi(2 * cp)[0::2][:N - cp]`` with ``cp`` the largest power of
  two below ``N``.
* ``"native"`` (transformers' ``MiniMaxLightningAttention.get_slope_rate``)::

      s_j = (1 / 2**(8 / N))**(j + 1) * (1 - l / (L - 1 + 1e-5) + 1e-5)

The two agree on the base for power-of-two ``N`` and differ in the layer factor by ~1e-5 relative
(the ``+1e-5`` inside the denominator); for other ``N`` the bases differ too.

``L == 1``: the remote formula divides by zero; we define its layer factor as ``1 + 1e-5`` (the
value at ``l = 0``, which is also the limit of the native formula), so a one-layer model is valid.
"""

from __future__ import annotations

import math

import numpy as np

SLOPE_FORMULAS = ("remote", "native")


def alibi_base_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes used by the remote code, float64 [N].

    Power-of-two ``N``: ``2**(-8 * (j + 1) / N)``. Otherwise the first ``cp`` slopes of the largest
    power of two ``cp < N`` followed by every other slope of ``2 * cp``.
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if num_heads & (num_heads - 1) == 0:
        return 2.0 ** (-8.0 * np.arange(1, num_heads + 1, dtype=np.float64) / num_heads)
    cp = 2 ** int(math.floor(math.log2(num_heads)))
    extra = alibi_base_slopes(2 * cp)[0::2][: num_heads - cp]
    return np.concatenate([alibi_base_slopes(cp), extra])


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int, formula: str) -> np.ndarray:
    """Decay rates of lightning layer ``layer_idx``: float32 [N] (computed in float64).

    Args:
      num_heads: N, lightning heads.
      layer_idx: global layer index l in [0, num_layers) (softmax layers counted).
      num_layers: L, total number of decoder layers.
      formula: ``"remote"`` (released checkpoints, vLLM) or ``"native"`` (transformers).
    """
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, {num_layers}), got {layer_idx}")
    if formula == "remote":
        base = alibi_base_slopes(num_heads)
        ratio = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
        factor = 1.0 - ratio + 1e-5
    elif formula == "native":
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        base = (1.0 / 2.0 ** (8.0 / num_heads)) ** np.arange(1, num_heads + 1, dtype=np.float64)
        factor = 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    else:
        raise ValueError(f"slope formula must be one of {SLOPE_FORMULAS}, got {formula!r}")
    return (base * factor).astype(np.float32)
