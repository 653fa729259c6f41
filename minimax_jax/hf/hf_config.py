"""Hugging Face configs of the MiniMax-01 family, read and written: the one place for both schemas.

Two Hugging Face config schemas are read and written (``from_hf`` / ``to_hf``):

* ``"remote"``: the MiniMax remote code (``MiniMaxText01ForCausalLM`` / ``MiniMaxM1ForCausalLM``,
  model_type ``minimax_text_01`` / ``minimax_m1``, or ``MiniMaxText01`` / ``MiniMaxM1`` as that
  code's configuration classes save it), which the released checkpoints ship with.
* ``"native"``: transformers' own ``minimax`` model (``MiniMaxForCausalLM``, the ``-hf``
  checkpoints).

Keys that change the computed function are never defaulted silently: a missing or contradictory
one raises ``ValueError`` naming the key. Keys that do not (``initializer_range``, ``use_cache``,
``router_*``, token ids, ``block_size``, which only chunks the lightning scan) may be absent.

Things neither schema can express are written as extra ``minimax_jax_*`` keys, which both
transformers and the remote code keep as plain attributes and ignore:

* ``minimax_jax_slope_formula``: written when ``slope_formula`` is not the schema's own formula
  (remote -> ``"remote"``, native -> ``"native"``), so ``from_hf(to_hf(s))`` restores it exactly.
  A remote-formula config written as native therefore keeps its exact decays in minimax_jax, but
  transformers will compute native decays from it: for power-of-two head counts they differ only
  in the layer factor (relative change <= 1e-5, below bf16 resolution), so this is silent; for
  other head counts the ALiBi bases differ materially and ``to_hf`` warns (``UserWarning``).
* ``minimax_jax_lightning_norm_eps``: written when ``lightning_norm_eps`` != 1e-6 (hard-coded by
  both implementations).
* ``block_size`` is written to a remote config only when it is not the hard-coded 256 (the
  transformers legacy-config conversion reads it too).

A VL-01 config contributes its ``text_config``. A key whose absence or contradiction would change
the model raises ValueError naming it. This module is jax-free and imports nothing of
minimax_jax: ``ModelConfig.from_hf`` / ``to_hf`` call ``fields_from_hf`` / ``to_hf_dict``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
SCHEMAS = ("remote", "native")

# HF architecture name -> model_type.
REMOTE_ARCHITECTURES = {
    "MiniMaxText01ForCausalLM": "minimax_text_01",
    "MiniMaxM1ForCausalLM": "minimax_m1",
}
NATIVE_ARCHITECTURES = {"MiniMaxForCausalLM": "minimax"}
# The remote code's configuration classes set model_type to these spellings, so a config.json
# that code saves (save_pretrained; also VL-01's nested text_config) carries them; the hub files
# say minimax_m1 / minimax_text_01. Both are read; ours are written.
MODEL_TYPE_ALIASES = {"MiniMaxM1": "minimax_m1", "MiniMaxText01": "minimax_text_01"}
VL_ARCHITECTURES = {"MiniMaxVL01ForConditionalGeneration": "minimax_vl_01"}
_REMOTE_AUTO_MAP = {
    "MiniMaxText01ForCausalLM": (
        "configuration_minimax_text_01",
        "MiniMaxText01Config",
        "modeling_minimax_text_01",
    ),
    "MiniMaxM1ForCausalLM": ("configuration_minimax_m1", "MiniMaxM1Config", "modeling_minimax_m1"),
}
_DEFAULT_BLOCK_SIZE = 256
_DEFAULT_LIGHTNING_NORM_EPS = 1e-6
_EXTRA_SLOPE_KEY = "minimax_jax_slope_formula"
_EXTRA_LNORM_KEY = "minimax_jax_lightning_norm_eps"
# The three residual mixes: (ModelConfig prefix, remote key infix, native key prefix).
_MIXES = (
    ("linear_attn", "linear_attention", "linear_attn"),
    ("full_attn", "full_attention", "full_attn"),
    ("mlp", "mlp", "mlp"),
)


def load_hf_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config at {path!r}: pass a config.json or its directory")
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 (byte {e.start}); expected an HF config.json"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return d


def _detect(d: Mapping[str, Any]) -> tuple[str, str]:
    """Returns (schema, architecture) of a text config; "vl" schema for the VL-01 wrapper."""
    archs = d.get("architectures")
    model_type = d.get("model_type")
    if isinstance(model_type, str):
        model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    known = {**REMOTE_ARCHITECTURES, **NATIVE_ARCHITECTURES, **VL_ARCHITECTURES}
    arch = None
    if archs:
        if not isinstance(archs, list | tuple) or archs[0] not in known:
            raise ValueError(
                f"'architectures' {archs!r} is not a MiniMax-01 model: expected one of "
                f"{sorted(known)}"
            )
        arch = archs[0]
    if model_type is not None and model_type not in known.values():
        raise ValueError(
            f"'model_type' {model_type!r} is not a MiniMax-01 model: expected one of "
            f"{sorted(set(known.values()) | set(MODEL_TYPE_ALIASES))}"
        )
    if arch is None and model_type is None:
        raise ValueError("config has neither 'architectures' nor 'model_type': cannot tell schema")
    if arch is None:
        arch = next(a for a, t in known.items() if t == model_type)

    def family(a_or_t: str) -> str:
        for name, table in (
            ("remote", REMOTE_ARCHITECTURES),
            ("native", NATIVE_ARCHITECTURES),
            ("vl", VL_ARCHITECTURES),
        ):
            if a_or_t in table or a_or_t in table.values():
                return name
        raise AssertionError(a_or_t)

    schema = family(arch)
    if model_type is not None and family(model_type) != schema:
        raise ValueError(
            f"'architectures' {arch!r} and 'model_type' {model_type!r} contradict each other "
            "(one is the remote-code schema, the other not): fix one of them"
        )
    return schema, arch


def stored_dtype(d: Mapping[str, Any]) -> str | None:
    """The weights' dtype a config records (``dtype``, transformers 5, or ``torch_dtype``; a
    VL-01 config's own, else its text_config's), e.g. "bfloat16"; None when it records none."""
    for source in (d, d.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source, Mapping) and source.get(key) is not None:
                return str(source[key]).removeprefix("torch.")
    return None


def _require(d: Mapping[str, Any], key: str, schema: str) -> Any:
    if key not in d or d[key] is None:
        raise ValueError(
            f"{schema} MiniMax config is missing {key!r}: it changes the model, so it is never "
            "defaulted; add it to config.json"
        )
    return d[key]


def _check_no_shared_expert_or_window(d: Mapping[str, Any]) -> None:
    shared = d.get("shared_intermediate_size", 0)
    shared_list = shared if isinstance(shared, list | tuple) else [shared]
    if any(x not in (0, None) for x in shared_list):
        raise ValueError(
            f"'shared_intermediate_size' is {shared!r}: shared experts are not supported "
            "(MiniMax-Text-01/M1 use 0)"
        )
    if d.get("sliding_window") is not None:
        raise ValueError(
            f"'sliding_window' is {d['sliding_window']!r}: sliding-window attention is not "
            "supported (MiniMax-Text-01/M1 use null)"
        )
    if d.get("rope_scaling") is not None:
        raise ValueError(f"'rope_scaling' {d['rope_scaling']!r} is not supported: use null")


def fields_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ModelConfig`` fields (keyword arguments) an HF config dict describes."""
    schema, arch = _detect(d)
    if schema == "vl":
        text = d.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError(f"{arch} config has no 'text_config' object: cannot read the LM")
        text = dict(text)
        # VL-01's text_config names no architecture: it is the Text-01 LM (remote schema).
        if not text.get("architectures") and text.get("model_type") is None:
            text["model_type"] = "minimax_text_01"
        if not text.get("architectures"):
            text_schema, _ = _detect(text)
            text["architectures"] = [
                "MiniMaxText01ForCausalLM" if text_schema == "remote" else "MiniMaxForCausalLM"
            ]
        return fields_from_hf(text)
    _check_no_shared_expert_or_window(d)
    num_layers = int(_require(d, "num_hidden_layers", schema))
    if schema == "remote":
        fields = _remote_fields(d, num_layers)
    else:
        fields = _native_fields(d, num_layers)
    hidden = int(_require(d, "hidden_size", schema))
    heads = int(_require(d, "num_attention_heads", schema))
    head_dim = d.get("head_dim")
    head_dim = hidden // heads if head_dim is None else int(head_dim)
    if fields["rotary_dim"] is None:  # native without partial rotary: full RoPE
        fields["rotary_dim"] = head_dim
    eos = d.get("eos_token_id")
    fields.update(
        vocab_size=int(_require(d, "vocab_size", schema)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=int(_require(d, "num_key_value_heads", schema)),
        intermediate_size=int(_require(d, "intermediate_size", schema)),
        num_experts=int(_require(d, "num_local_experts", schema)),
        num_experts_per_tok=int(_require(d, "num_experts_per_tok", schema)),
        max_position_embeddings=int(_require(d, "max_position_embeddings", schema)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        lightning_norm_eps=float(d.get(_EXTRA_LNORM_KEY, _DEFAULT_LIGHTNING_NORM_EPS)),
        slope_formula=d.get(_EXTRA_SLOPE_KEY, schema),
        hidden_act=d.get("hidden_act", "silu"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
        schema=schema,
        architecture=arch,
    )
    return fields


def _remote_fields(d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    attn = _require(d, "attn_type_list", "remote")
    if len(attn) != num_layers:
        raise ValueError(
            f"'attn_type_list' has {len(attn)} entries but 'num_hidden_layers' is {num_layers}"
        )
    if any(a not in (0, 1) for a in attn):
        raise ValueError(f"'attn_type_list' values must be 0 (lightning) or 1 (softmax): {attn}")
    layer_types = tuple(FULL if a == 1 else LINEAR for a in attn)
    if d.get("layer_types") is not None and tuple(d["layer_types"]) != layer_types:
        raise ValueError("'layer_types' contradicts 'attn_type_list': keep only one of them")
    postnorm = _require(d, "postnorm", "remote")
    if not isinstance(postnorm, bool):
        raise ValueError(f"'postnorm' must be true or false, got {postnorm!r}")
    fields: dict[str, Any] = {
        "layer_types": layer_types,
        "postnorm": postnorm,
        "rope_theta": float(_require(d, "rope_theta", "remote")),
        "rotary_dim": int(_require(d, "rotary_dim", "remote")),
        "block_size": int(d.get("block_size", _DEFAULT_BLOCK_SIZE)),
    }
    for ours, remote, _ in _MIXES:
        for ab in ("alpha", "beta"):
            fields[f"{ours}_{ab}"] = float(_require(d, f"layernorm_{remote}_{ab}", "remote"))
    return fields


def _native_fields(d: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    layer_types = tuple(_require(d, "layer_types", "native"))
    if len(layer_types) != num_layers:
        raise ValueError(
            f"'layer_types' has {len(layer_types)} entries but 'num_hidden_layers' is {num_layers}"
        )
    bad = sorted({t for t in layer_types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"'layer_types' contains {bad}: entries must be one of {LAYER_TYPES}")
    if (
        d.get("attn_type_list") is not None
        and tuple(FULL if a == 1 else LINEAR for a in d["attn_type_list"]) != layer_types
    ):
        raise ValueError("'attn_type_list' contradicts 'layer_types': keep only one of them")
    if d.get("postnorm") is False:
        raise ValueError(
            "'postnorm' is false in a native config: transformers' minimax is always postnorm; "
            "use the remote schema for a pre-norm model"
        )
    rope_theta, rotary_dim = _native_rope(d)
    fields: dict[str, Any] = {
        "layer_types": layer_types,
        "postnorm": True,
        "rope_theta": rope_theta,
        "rotary_dim": rotary_dim,
        "block_size": int(d.get("block_size", _DEFAULT_BLOCK_SIZE)),
    }
    for ours, _, native in _MIXES:
        for ab in ("alpha", "beta"):
            fields[f"{ours}_{ab}"] = float(_require(d, f"{native}_{ab}_factor", "native"))
    return fields


def _native_rope(d: Mapping[str, Any]) -> tuple[float, int | None]:
    """(rope_theta, rotary_dim or None for full RoPE) of a native config.

    Accepts transformers-5 ``rope_parameters`` and the older top-level ``rope_theta``; a
    top-level ``rotary_dim`` (kept by the ``-hf`` conversions of the remote configs) is honoured,
    and must agree with ``partial_rotary_factor`` when both are present.
    """
    rope = d.get("rope_parameters")
    theta = d.get("rope_theta")
    factor = None
    if rope is not None:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"'rope_parameters' rope_type {rope_type!r} is not supported: use 'default'"
            )
        if rope.get("rope_theta") is None:
            raise ValueError("'rope_parameters' has no 'rope_theta'")
        if theta is not None and float(theta) != float(rope["rope_theta"]):
            raise ValueError(
                f"'rope_theta' ({theta}) contradicts 'rope_parameters.rope_theta' "
                f"({rope['rope_theta']}): keep only one"
            )
        theta = rope["rope_theta"]
        factor = rope.get("partial_rotary_factor")
    if theta is None:
        raise ValueError("native MiniMax config is missing 'rope_parameters' (or 'rope_theta')")
    hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
    head_dim = d.get("head_dim") or (hidden // heads if hidden and heads else None)
    rotary_dim = d.get("rotary_dim")
    if factor is not None and head_dim is not None:
        from_factor = head_dim * float(factor)
        if abs(from_factor - round(from_factor)) > 1e-6:
            raise ValueError(
                f"'partial_rotary_factor' {factor} times head_dim {head_dim} is not an integer"
            )
        if rotary_dim is not None and int(rotary_dim) != round(from_factor):
            raise ValueError(
                f"'rotary_dim' ({rotary_dim}) contradicts 'partial_rotary_factor' ({factor}) "
                f"x head_dim ({head_dim}): keep only one"
            )
        rotary_dim = round(from_factor)
    return float(theta), None if rotary_dim is None else int(rotary_dim)


# ----------------------------------------------------------------------------- writing


def to_hf_dict(cfg: Any, schema: str) -> dict[str, Any]:
    """HF ``config.json`` contents of ``cfg`` (a ``ModelConfig``) in ``schema``."""
    if schema == "remote":
        return _to_remote(cfg)
    if schema == "native":
        return _to_native(cfg)
    raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")


def write_hf_dict(d: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes ``d`` as JSON (sorted keys, indent 2); a directory ``path`` gets ``config.json``."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, "w") as f:
        f.write(_dumps(d))


def _common(cfg) -> dict[str, Any]:
    return {
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (
            list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
        ),
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_heads,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "num_local_experts": cfg.num_experts,
        "output_router_logits": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "router_aux_loss_coef": 0.001,  # training-only keys: the released values
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def _extras(cfg, schema: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.slope_formula != schema:
        out[_EXTRA_SLOPE_KEY] = cfg.slope_formula
        if schema == "native" and cfg.num_heads & (cfg.num_heads - 1):
            warnings.warn(
                f"writing a remote-slope config with {cfg.num_heads} heads (not a power of "
                "two) as native: transformers will use different lightning decays "
                f"(minimax_jax keeps them via {_EXTRA_SLOPE_KEY!r})",
                UserWarning,
                stacklevel=3,
            )
    if cfg.lightning_norm_eps != _DEFAULT_LIGHTNING_NORM_EPS:
        out[_EXTRA_LNORM_KEY] = cfg.lightning_norm_eps
    return out


def _to_remote(cfg) -> dict[str, Any]:
    arch = (
        cfg.architecture
        if cfg.architecture in REMOTE_ARCHITECTURES
        else ("MiniMaxText01ForCausalLM")
    )
    conf_mod, conf_cls, model_mod = _REMOTE_AUTO_MAP[arch]
    d = _common(cfg)
    d.update(
        architectures=[arch],
        model_type=REMOTE_ARCHITECTURES[arch],
        auto_map={
            "AutoConfig": f"{conf_mod}.{conf_cls}",
            "AutoModelForCausalLM": f"{model_mod}.{arch}",
        },
        attn_type_list=[int(t == FULL) for t in cfg.layer_types],
        postnorm=cfg.postnorm,
        rope_theta=_num(cfg.rope_theta),
        rotary_dim=cfg.rotary_dim,
        shared_intermediate_size=0,
        shared_moe_mode="sigmoid",
        transformers_version="4.45.2",  # the version the remote code was written against
    )
    for ours, remote, _ in _MIXES:
        d[f"layernorm_{remote}_alpha"] = getattr(cfg, f"{ours}_alpha")
        d[f"layernorm_{remote}_beta"] = getattr(cfg, f"{ours}_beta")
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    if cfg.block_size != _DEFAULT_BLOCK_SIZE:
        d["block_size"] = cfg.block_size
    d.update(_extras(cfg, "remote"))
    return dict(sorted(d.items()))


def _to_native(cfg) -> dict[str, Any]:
    if not cfg.postnorm:
        raise ValueError(
            "postnorm=False cannot be written in the native schema (transformers' minimax "
            "has no pre-norm residual mode): write schema='remote'"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _num(cfg.rope_theta)}
    if cfg.rotary_dim != cfg.head_dim:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    d = _common(cfg)
    d.update(
        architectures=["MiniMaxForCausalLM"],
        model_type="minimax",
        block_size=cfg.block_size,
        layer_types=list(cfg.layer_types),
        pad_token_id=cfg.pad_token_id,
        rope_parameters=rope,
    )
    for ours, _, native in _MIXES:
        d[f"{native}_alpha_factor"] = getattr(cfg, f"{ours}_alpha")
        d[f"{native}_beta_factor"] = getattr(cfg, f"{ours}_beta")
    d.update(_extras(cfg, "native"))
    return dict(sorted(d.items()))


def _num(x: float) -> int | float:
    """Writes integral floats as ints (``rope_theta: 10000000`` as in the real configs)."""
    return int(x) if float(x).is_integer() else float(x)


def _dumps(d: Mapping[str, Any]) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"
