"""transformers' MiniMaxForCausalLM as a decode anchor, in its default and its best configuration.

    model = hf_anchor.load(saved_dir, device)           # bf16, eval
    run = hf_anchor.Decoder(model, "compiled", batch, prompt, new)
    state = run.prefill(ids)                            # untimed: cache filled, first token
    tokens = run.decode(state)                          # timed: new - 1 greedy steps

Variants (what transformers 5.x offers for MiniMax, checked against transformers 5.23's source):
- "eager": the default: `MiniMaxCache` (a `DynamicCache` whose K/V grow by concatenation and
  whose lightning states are replaced per step), no compilation. A greedy loop of model calls,
  as `generate(do_sample=False)` makes them, without generate's per-step Python.
- "static": `StaticMiniMaxCache` below, no compilation.
- "compiled": the static cache and the one-token step under `torch.compile(mode=
  "reduce-overhead")` (inductor kernels replayed as CUDA graphs).
- "generate": `model.generate` end to end (prefill included): the anchor of earlier rows.
Why a cache of our own: `generate(cache_implementation="static")` cannot serve MiniMax, whose
model refuses any cache that is not a `MiniMaxCache` ("MiniMax uses cache of its own") and marks
itself `_can_compile_fullgraph = False` (its cache keeps Python lists). `StaticMiniMaxCache` is a
`MiniMaxCache` whose softmax layers are transformers' own `StaticLayer` (preallocated K/V
written in place, a tensor position counter) and whose lightning layers are transformers'
`LinearAttentionLayer` (one preallocated state updated in place): every buffer keeps its
address, as CUDA graphs need, and the model code runs unchanged. The softmax layers' mask sizes
come from the first full-attention layer (the linear layers say `is_linear`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.models.minimax.modeling_minimax import MiniMaxCache

VARIANTS = ("eager", "static", "compiled", "generate")


class StaticMiniMaxCache(MiniMaxCache):
    """A MiniMaxCache with fixed buffers: StaticLayer K/V for softmax layers, a
    LinearAttentionLayer state per lightning layer, both updated in place."""

    def __init__(self, config, max_cache_len: int):
        # transformers >= 5.x layer classes (a version without them fails here, as a row)
        from transformers.cache_utils import LinearAttentionLayer, StaticLayer

        super().__init__()
        self.layer_class_to_replicate = None
        self.layers = [
            LinearAttentionLayer() if t == "linear_attention" else StaticLayer(max_cache_len)
            for t in config.layer_types
        ]
        self.linear_cache = [[] for _ in self.layers]
        self._has_state = [False] * len(self.layers)

    def set_linear_cache(self, layer_idx, linear_cache):
        state = self.layers[layer_idx].update_recurrent_state(linear_cache)
        self.linear_cache[layer_idx] = state
        self._has_state[layer_idx] = True

    def get_linear_cache(self, layer_idx: int):
        # None before the prefill: the model then runs its blockwise prefill path
        return self.linear_cache[layer_idx] if self._has_state[layer_idx] else None

    def reset(self):
        """Empty the cache for a new prompt; every buffer keeps its address."""
        for layer in self.layers:
            if hasattr(layer, "cumulative_length"):  # a StaticLayer
                if layer.is_initialized:
                    layer.keys.zero_()
                    layer.values.zero_()
                layer.cumulative_length.zero_()
        self._has_state = [False] * len(self.layers)


def load(path: str, device: str, dtype=torch.bfloat16, experts: str | None = None):
    """transformers' MiniMaxForCausalLM from a saved checkpoint, in eval mode on device."""
    import transformers

    kw = {} if experts is None else {"experts_implementation": experts}
    model = transformers.MiniMaxForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model.to(device).eval()


@dataclasses.dataclass
class Decoder:
    """Greedy decoding of `new` tokens after a prompt, one variant (see the module docstring)."""

    model: Any
    variant: str
    batch: int
    prompt: int
    new: int
    compile_backend: str = "inductor"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        self.device = next(self.model.parameters()).device
        self.cache = None
        if self.variant in ("static", "compiled"):
            self.cache = StaticMiniMaxCache(self.model.config, self.prompt + self.new)
        self.step = self._step
        if self.variant == "compiled":
            if self.compile_backend == "inductor":
                self.step = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
            else:  # tests: dynamo tracing without code generation
                self.step = torch.compile(self._step, backend=self.compile_backend, dynamic=False)

    def _step(self, token, position, cache):
        out = self.model(input_ids=token, position_ids=position, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        """(cache, first token [B,1]) after the prompt ids [B,T] (untimed part)."""
        if self.variant == "generate":
            return ids, None
        cache = self.cache if self.cache is not None else MiniMaxCache()
        if self.cache is not None:
            cache.reset()
        pos = torch.arange(ids.shape[1], device=self.device)[None].expand(ids.shape[0], -1)
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)  # fmt: skip
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def decode(self, state) -> torch.Tensor:
        """The timed part: new - 1 greedy steps from the prefilled state -> tokens [B, new]
        (the first one from the prefill). "generate": the whole generate call."""
        if self.variant == "generate":
            ids, _ = state
            out = self.model.generate(ids, max_new_tokens=self.new, min_new_tokens=self.new,
                                      do_sample=False)  # fmt: skip
            return out[:, ids.shape[1] :]
        cache, token = state
        tokens = [token]
        for i in range(self.new - 1):
            pos = torch.full((token.shape[0], 1), self.prompt + i, device=self.device)
            if self.variant == "compiled":
                torch.compiler.cudagraph_mark_step_begin()
            token = self.step(token, pos, cache).argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)
