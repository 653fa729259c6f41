r"""Check a converted checkpoint: transformers (CPU, fp32) vs minimax_jax on the same tokens.

    python -m convert.check_logits --reference HF_DIR --candidate DIR [--prompt TEXT]
        [--num_tokens 64] [--rtol 1e-3] [--max_kl 1e-4] [--min_top1 0.99]

The reference is always run by transformers' own ``MiniMaxForCausalLM`` in fp32 on CPU (no remote
code: this must work offline). The candidate (an HF directory or a ``convert.hf_to_orbax`` output)
is loaded with ``minimax_jax.from_pretrained`` in fp32. Prints max absolute / relative logit
error, KL(reference || candidate) per position (mean and max) and top-1 / top-5 agreement; exits
0 when every threshold holds, 1 when one fails, 2 on errors (one line on stderr).

Reference schemas:

* native (``MiniMaxForCausalLM``, the ``-hf`` repos): loaded as is.
* remote (``MiniMaxText01ForCausalLM`` / ``MiniMaxM1ForCausalLM``): transformers cannot run the
  remote code offline, so its config is rewritten in the native schema in a temporary directory
  whose weight files are links to the originals (transformers reads the per-expert names).
  Caveat: transformers' ``minimax`` (<= 5.23) applies RoPE to all head dims, while MiniMax
  rotates only the first ``rotary_dim`` (64 of 128 in the real models). For such configs the
  reference's rotary is patched for the duration of the run to rotate the first ``rotary_dim``
  dims with frequencies over ``rotary_dim`` (the MiniMax rule); ``--no_patch_rope`` turns this
  off (then partial-RoPE models are expected to fail). The slope formulas of the two schemas
  differ by <= 1e-5 relative for power-of-two head counts, below the default thresholds.

Tokens: ``--prompt`` is tokenized with the reference's tokenizer files (offline); without it
``--num_tokens`` random ids from ``--seed`` are used.
Memory: both models are held in fp32 on the host, ~2 x 4 bytes per parameter (~3.6 TB for the
456B models): check real checkpoints on a machine that size; there is no truncated-layer mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from minimax_jax import cli, paths
from minimax_jax.config import ModelConfig
from minimax_jax.hf.pretrained import from_pretrained

from .common import run_cli

# Its own FlagValues: `--prompt` / `--seed` also exist in `minimax_jax.generate`, and tests import
# both modules into one process. `run()` joins them to absl's FLAGS for parsing and --help.
_FLAGS = flags.FlagValues()
_REFERENCE = flags.DEFINE_string(
    "reference", None, "HF directory (or hub id, URL) run by transformers.", flag_values=_FLAGS
)
_CANDIDATE = flags.DEFINE_string(
    "candidate", None, "HF or Orbax directory (or hub id, URL) run by minimax_jax.",
    flag_values=_FLAGS,
)  # fmt: skip
_PROMPT = flags.DEFINE_string(
    "prompt", None, "Text to tokenize with the reference tokenizer.", flag_values=_FLAGS
)
_NUM_TOKENS = flags.DEFINE_integer(
    "num_tokens", 64, "Random tokens when there is no prompt.", lower_bound=1, flag_values=_FLAGS
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the random tokens.", lower_bound=0, upper_bound=cli.SEED_MAX,
    flag_values=_FLAGS,
)  # fmt: skip
_RTOL = flags.DEFINE_float("rtol", 1e-3, "Largest allowed max|a-b| / max|ref|.", flag_values=_FLAGS)
_MAX_KL = flags.DEFINE_float(
    "max_kl", 1e-4, "Largest allowed per-position KL (nats).", flag_values=_FLAGS
)
_MIN_TOP1 = flags.DEFINE_float(
    "min_top1", 0.99, "Smallest allowed top-1 agreement.", flag_values=_FLAGS
)
_PATCH_ROPE = flags.DEFINE_bool(
    "patch_rope", True, "Patch transformers for partial RoPE.", flag_values=_FLAGS
)

cli.finite(_RTOL, minimum=0)
cli.finite(_MAX_KL, minimum=0)
cli.finite(_MIN_TOP1, minimum=0, maximum=1)
_HOLDERS = (_REFERENCE, _CANDIDATE, _PROMPT, _NUM_TOKENS, _SEED, _RTOL, _MAX_KL, _MIN_TOP1,
            _PATCH_ROPE)  # fmt: skip

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def compare(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> dict[str, float]:
    """Error metrics of logits [..., V] (float64 math)."""
    ref = np.asarray(reference, np.float64).reshape(-1, reference.shape[-1])
    got = np.asarray(candidate, np.float64).reshape(-1, candidate.shape[-1])
    if not np.all(np.isfinite(got)):
        return {
            "finite": 0.0,
            "max_abs": np.inf,
            "max_rel": np.inf,
            "kl_mean": np.inf,
            "kl_max": np.inf,
            "top1": 0.0,
            f"top{k}_overlap": 0.0,
        }
    diff = np.abs(ref - got)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = np.sum(np.exp(lp) * (lp - lq), -1)
    top_ref, top_got = np.argsort(-ref, -1)[:, :k], np.argsort(-got, -1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_got, strict=True)]
    return {
        "finite": 1.0,
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / max(np.abs(ref).max(), 1e-30)),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float(np.mean(top_ref[:, 0] == top_got[:, 0])),
        f"top{k}_overlap": float(np.mean(overlap)),
    }


@contextlib.contextmanager
def native_view(hf_dir: Path, config: ModelConfig) -> Iterator[Path]:
    """``hf_dir`` itself if native, else a temporary native-schema copy with linked weights."""
    if config.schema == "native":
        yield hf_dir
        return
    with tempfile.TemporaryDirectory(prefix="check_logits-") as tmp:
        for f in hf_dir.iterdir():
            if f.name.endswith(WEIGHT_SUFFIXES):
                os.symlink(f.resolve(), Path(tmp) / f.name)
        config.save_hf(Path(tmp) / "config.json", "native")
        yield Path(tmp)


@contextlib.contextmanager
def partial_rope(model: Any, rotary_dim: int, theta: float) -> Iterator[None]:
    """Makes transformers' minimax rotate only the first ``rotary_dim`` head dims (restored)."""
    import torch
    from transformers.models.minimax import modeling_minimax as mm

    full = mm.apply_rotary_pos_emb

    def rotate_prefix(q, k, cos, sin, *args, **kwargs):
        q_rot, k_rot = full(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, *args, **kwargs)
        q_out = torch.cat([q_rot, q[..., rotary_dim:]], dim=-1)
        return q_out, torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)

    rotary = model.model.rotary_emb
    saved = rotary.inv_freq
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    rotary.inv_freq = (1.0 / theta**exponents).to(torch.float32)
    mm.apply_rotary_pos_emb = rotate_prefix
    try:
        yield
    finally:
        mm.apply_rotary_pos_emb = full
        rotary.inv_freq = saved


def reference_logits(hf_dir: Path, ids: np.ndarray, patch_rope: bool) -> np.ndarray:
    """transformers fp32 CPU logits [B, T, V] of ``ids``."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # the load report lists derived buffers
    config = ModelConfig.from_hf(hf_dir)
    with native_view(hf_dir, config) as path:
        model = transformers.MiniMaxForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    rope = config.rotary_dim != config.head_dim and patch_rope
    ctx = partial_rope(model, config.rotary_dim, config.rope_theta) if rope else None
    with torch.no_grad(), ctx or contextlib.nullcontext():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def candidate_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """minimax_jax fp32 logits [B, T, V] of ``ids``."""
    jax.config.update("jax_default_matmul_precision", "highest")
    model = from_pretrained(path)
    return np.asarray(jax.device_get(model(ids)), np.float32)


def token_ids(reference: Path, prompt: str | None, num_tokens: int, seed: int, vocab: int):
    """([1, T] ids, source): the tokenized prompt, else ``num_tokens`` random ids."""
    if prompt is None:
        return np.random.default_rng(seed).integers(0, vocab, (1, num_tokens)), "random"
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(reference, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load the tokenizer in {reference} ({e}); drop --prompt to use random tokens"
        ) from None
    ids = np.asarray([tok(prompt)["input_ids"]], np.int64)
    if ids.size == 0 or ids.max() >= vocab:
        raise ValueError(f"--prompt gives {ids.size} tokens, ids must be in [0, {vocab})")
    return ids, "prompt"


def check(
    *,
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    prompt: str | None = None,
    num_tokens: int = 64,
    seed: int = 0,
    rtol: float = 1e-3,
    max_kl: float = 1e-4,
    min_top1: float = 0.99,
    patch_rope: bool = True,
) -> tuple[bool, dict[str, Any]]:
    """Runs both models on the same tokens; returns (passed, metrics + thresholds).

    ``reference`` and ``candidate`` may be local directories, Hugging Face hub ids or URLs
    (``minimax_jax.paths``; a URL is copied to a temporary directory for the run)."""
    with (
        paths.as_local(reference, "--reference") as ref_dir,
        paths.as_local(candidate, "--candidate") as cand_dir,
    ):
        return _check(ref_dir, cand_dir, prompt, num_tokens, seed, rtol, max_kl, min_top1,
                      patch_rope)  # fmt: skip


def _check(
    reference: Path,
    candidate: Path,
    prompt: str | None,
    num_tokens: int,
    seed: int,
    rtol: float,
    max_kl: float,
    min_top1: float,
    patch_rope: bool,
) -> tuple[bool, dict[str, Any]]:
    ref_config, cand_config = ModelConfig.from_hf(reference), ModelConfig.from_hf(candidate)
    differ = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("schema", "architecture")
        and getattr(ref_config, f.name) != getattr(cand_config, f.name)
    ]
    if differ:
        raise ValueError(f"{reference} and {candidate} configs differ in {', '.join(differ)}")
    ids, source = token_ids(reference, prompt, num_tokens, seed, ref_config.vocab_size)
    metrics = compare(
        reference_logits(reference, ids, patch_rope), candidate_logits(candidate, ids)
    )
    passed = (
        metrics["max_rel"] <= rtol and metrics["kl_max"] <= max_kl and metrics["top1"] >= min_top1
    )
    return passed, metrics | {"tokens": int(ids.size), "token_source": source}


def main(argv: list[str]) -> None:
    _FLAGS.mark_as_parsed()  # parsed through absl's FLAGS, which holds the same Flag objects
    if len(argv) > 1:
        cli.error_exit(f"unexpected arguments {argv[1:]}: every input is a flag (see --help)")
    if not _REFERENCE.value or not _CANDIDATE.value:
        cli.error_exit("--reference and --candidate are required (see --help)")
    for holder in (_REFERENCE, _CANDIDATE):
        try:
            local = paths.classify(holder.value, f"--{holder.name}") == paths.LOCAL
        except paths.PathError as e:
            cli.error_exit(str(e))
        if local and not (Path(holder.value) / "config.json").is_file():
            what = "no config.json in it" if Path(holder.value).is_dir() else "not a directory"
            cli.error_exit(
                f"--{holder.name} {holder.value}: {what}; expected a checkpoint directory"
            )
    result: dict[str, Any] = {}

    def work() -> None:
        result["passed"], result["metrics"] = check(
            reference=_REFERENCE.value,
            candidate=_CANDIDATE.value,
            prompt=_PROMPT.value,
            num_tokens=_NUM_TOKENS.value,
            seed=_SEED.value,
            rtol=_RTOL.value,
            max_kl=_MAX_KL.value,
            min_top1=_MIN_TOP1.value,
            patch_rope=_PATCH_ROPE.value,
        )

    run_cli(work, exit_code=2)
    m = result["metrics"]
    print(
        f"{m['tokens']} {m['token_source']} tokens: max abs err {m['max_abs']:.3e}, "
        f"max rel err {m['max_rel']:.3e} (<= {_RTOL.value:g}), KL mean {m['kl_mean']:.3e} "
        f"max {m['kl_max']:.3e} (<= {_MAX_KL.value:g}), top-1 agreement {m['top1']:.4f} "
        f"(>= {_MIN_TOP1.value:g}), top-5 overlap {m['top5_overlap']:.4f}"
    )
    print("PASS" if result["passed"] else "FAIL")
    sys.exit(0 if result["passed"] else 1)


def run() -> None:
    """Console-script entry point."""
    cli.run(main, __doc__, _HOLDERS, extra=_FLAGS)


if __name__ == "__main__":
    run()
