"""Checkpoint conversion CLIs on top of ``minimax_jax.hf``: ``python -m convert.<tool>`` from a
checkout. The wheel installs this package as ``minimax_jax_convert`` (no generic top-level name;
console scripts ``minimax-jax-hf-to-orbax``, ``-orbax-to-hf``, ``-check-logits``), so its modules
import one another relatively."""
