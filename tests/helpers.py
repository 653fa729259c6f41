"""Small pieces several test files share (imported as `helpers`; tests/ is on sys.path)."""

import jax

# Residual-scale factors unlike the released 1.0 defaults, so a swapped alpha/beta or a factor
# applied to the wrong branch changes the output (transformers' MiniMaxConfig keyword names).
SCALE_FACTORS = {"full_attn_alpha_factor": 1.5, "linear_attn_alpha_factor": 1.3,
                 "mlp_alpha_factor": 1.7, "full_attn_beta_factor": 0.9,
                 "linear_attn_beta_factor": 1.1, "mlp_beta_factor": 0.8}  # fmt: skip

# Mesh shapes over the 8 simulated CPU devices (None: one device).
MESHES = {
    "data8": dict(data=8, fsdp=1),
    "data2_expert4": dict(data=2, fsdp=1, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "single": None,
}


def bytes_on_first_device(tree) -> int:
    """Bytes of the shards of a placed pytree that live on jax.devices()[0]."""
    device0 = jax.devices()[0]
    return sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for s in leaf.addressable_shards
        if s.device == device0
    )
