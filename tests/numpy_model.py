"""An independent float64 NumPy implementation of the MiniMax text model, for tests.

It shares no code with minimax_jax.ops: the lightning layers run the token-by-token recurrence,
RoPE rotates the first `rotary_dim` dims with its own tables, the MoE loops over tokens, and both
residual modes (postnorm true/false) are written out. Parameters use the model's layout (pure dict).
"""

import numpy as np


def rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def remote_slopes(n_heads, layer, n_layers):
    """Remote-code slopes written from SPEC; ALiBi interleaving for non-power-of-2 head counts."""

    def pow2(n):
        start = 2.0 ** (-(2.0 ** -(np.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    def base(n):
        if np.log2(n).is_integer():
            return pow2(n)
        cp = 2 ** int(np.floor(np.log2(n)))
        return pow2(cp) + base(2 * cp)[0::2][: n - cp]

    return np.array(base(n_heads)) * (1 - layer / (n_layers - 1) + 1e-5)


def native_slopes(n_heads, layer, n_layers):
    b = 1.0 / 2 ** (8.0 / n_heads)
    return b ** (np.arange(n_heads) + 1) * (1 - layer / (n_layers - 1 + 1e-5) + 1e-5)


def lightning(p, x, slopes, eps):
    t, _ = x.shape
    n, h = p["norm"].shape
    qkv = silu(np.einsum("td,dnch->tnch", x, p["qkv"]))
    state = np.zeros((n, h, h))
    out = np.zeros((t, n, h))
    for i in range(t):
        state = np.exp(-slopes)[:, None, None] * state + np.einsum(
            "nh,ne->nhe", qkv[i, :, 1], qkv[i, :, 2]
        )
        out[i] = np.einsum("nh,nhe->ne", qkv[i, :, 0], state)
    o = rmsnorm(out.reshape(t, n * h), p["norm"].reshape(-1), eps)
    gate = 1 / (1 + np.exp(-np.einsum("td,dnh->tnh", x, p["gate"]).reshape(t, n * h)))
    return np.einsum("tnh,nhd->td", (gate * o).reshape(t, n, h), p["out"])


def rope(x, rotary_dim, theta):
    t = x.shape[0]
    out = x.copy()
    half = rotary_dim // 2
    for pos in range(t):
        for i in range(half):
            ang = pos / theta ** (2 * i / rotary_dim)
            a, b = x[pos, :, i], x[pos, :, i + half]
            out[pos, :, i] = a * np.cos(ang) - b * np.sin(ang)
            out[pos, :, i + half] = b * np.cos(ang) + a * np.sin(ang)
    return out


def softmax_attn(p, x, rotary_dim, theta):
    t = x.shape[0]
    q = rope(np.einsum("td,dnh->tnh", x, p["q"]), rotary_dim, theta)
    k = rope(np.einsum("td,dkh->tkh", x, p["k"]), rotary_dim, theta)
    v = np.einsum("td,dkh->tkh", x, p["v"])
    n, kh, h = q.shape[1], k.shape[1], q.shape[2]
    out = np.zeros_like(q)
    for j in range(n):
        kv = j // (n // kh)
        s = q[:, j] @ k[:, kv].T / np.sqrt(h)
        s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, j] = (w / w.sum(-1, keepdims=True)) @ v[:, kv]
    return np.einsum("tnh,nhd->td", out, p["o"])


def moe(p, x, top_k):
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        top = np.argsort(-probs[i])[:top_k]
        w = probs[i, top] / probs[i, top].sum()
        for e, we in zip(top, w, strict=True):
            hid = silu(x[i] @ p["wi"][e, :, 0]) * (x[i] @ p["wi"][e, :, 1])
            out[i] += we * (hid @ p["wo"][e])
    return out


def forward(cfg, params, ids, slope_fn):
    """ids [T] -> logits [T,V] in float64 for one unpadded sequence."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f64(params["embed"])[ids]
    for l, kind in enumerate(cfg.layer_types):
        b, pos = divmod(l, cfg.period)
        lp = {k: v for k, v in _layer(params["blocks"][pos], b, f64).items()}
        u = rmsnorm(x, lp["input_norm"], cfg.rms_norm_eps)
        if kind == "linear_attention":
            s = slope_fn(cfg.num_heads, l, cfg.num_layers)
            a = lightning(lp["attn"], u, s, cfg.lightning_norm_eps)
            alpha, beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        else:
            a = softmax_attn(lp["attn"], u, cfg.rotary_dim, cfg.rope_theta)
            alpha, beta = cfg.full_attn_alpha, cfg.full_attn_beta
        h = alpha * (u if cfg.postnorm else x) + beta * a
        v = rmsnorm(h, lp["post_attn_norm"], cfg.rms_norm_eps)
        m = moe(lp["moe"], v, cfg.num_experts_per_tok)
        x = cfg.mlp_alpha * (v if cfg.postnorm else h) + cfg.mlp_beta * m
    x = rmsnorm(x, f64(params["final_norm"]), cfg.rms_norm_eps)
    head = f64(params["embed"]).T if cfg.tie_word_embeddings else f64(params["lm_head"])
    return x @ head


def _layer(block, b, f64):
    def pick(tree):
        return {k: pick(v) if isinstance(v, dict) else f64(v)[b] for k, v in tree.items()}

    return pick(block)
