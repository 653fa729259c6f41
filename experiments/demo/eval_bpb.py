"""Held-out bits per byte of a checkpoint (each model with its own tokenizer), on CPU.

    python experiments/demo/eval_bpb.py --checkpoint minimax_jax/demo_model --window 1024
    python experiments/demo/eval_bpb.py --checkpoint /tmp/old_demo --window 256

bits per byte = (sum over the scored tokens of -ln p(token | context)) / ln 2 / (UTF-8 bytes of
the scored text). Every file of ``--files`` (default: ``heldout_files.txt`` under ``--root``,
the CPython 3.11.7 standard library) is one document: it is tokenised alone, preceded by the
eos token (what ends the previous document in training), and every one of its tokens is
scored, so the bytes counted are exactly the file's bytes whatever the tokenizer. A model sees
at most ``--window`` tokens at once (use its training sequence length): windows advance by
``--stride`` tokens and each scores only its last ``stride`` targets, so every target after the
first window has at least ``window - stride`` tokens of context. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DEFAULT_ROOT = "/root/.pyenv/versions/3.11.7/lib/python3.11"


def heldout_paths(root: str | Path, listing: str | Path = HERE / "heldout_files.txt") -> list:
    """The held-out files, in list order, as paths under ``root``."""
    names = [line.split("#")[0].strip() for line in Path(listing).read_text().splitlines()]
    return [Path(root) / n for n in names if n]


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(a, s, e) per window over a sequence z of n+1 tokens (z[0] = eos, z[1:] = the text):
    inputs z[a:e-1], scored targets z[s:e]. The targets of all windows are 1..n, each once."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    out, s = [], 1
    while s <= n:
        e = min(s + (window if s == 1 else stride), n + 1)
        out.append((max(0, e - 1 - window), s, e))
        s = e
    return out


class Scorer:
    """A checkpoint's model and tokenizer; `nll(text)` in nats over all the text's tokens."""

    def __init__(
        self, checkpoint: str, window: int, stride: int, batch: int = 8, quantize: str | None = None
    ):
        import jax
        import jax.numpy as jnp

        from minimax_jax import from_pretrained
        from minimax_jax.inference.tokenizer import ChatTokenizer

        self.model = from_pretrained(checkpoint, dtype=jnp.float32, quantize=quantize)
        self.tok = ChatTokenizer.from_dir(checkpoint)
        eos = self.tok.eos_token_ids
        if not eos:
            raise ValueError(f"{checkpoint}: the tokenizer has no eos token to start documents")
        self.eos = int(eos[0])  # <end_of_sentence>, which ends every training document
        self.window, self.stride, self.batch = window, stride, batch

        @jax.jit
        def logprobs(ids, mask):
            return jax.nn.log_softmax(self.model(ids, mask).astype(jnp.float32), axis=-1)

        self._logprobs = logprobs

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def nll(self, text: str) -> tuple[float, int]:
        """(sum of -ln p over the tokens of text, number of tokens)."""
        ids = self.encode(text)
        z = np.asarray([self.eos, *ids], np.int32)
        jobs = windows(len(ids), self.window, self.stride)
        total = 0.0
        for i in range(0, len(jobs), self.batch):
            chunk = jobs[i : i + self.batch]
            inp = np.zeros((self.batch, self.window), np.int32)
            mask = np.zeros((self.batch, self.window), np.int32)
            for r, (a, _, e) in enumerate(chunk):  # left-padded to the window
                seq = z[a : e - 1]
                inp[r, self.window - len(seq) :] = seq
                mask[r, self.window - len(seq) :] = 1
            lp = np.asarray(self._logprobs(inp, mask))
            for r, (_, s, e) in enumerate(chunk):
                # position p of z sits at column window - (e - 1 - a) + (p - a) = window - e + 1 + p
                cols = self.window - e + 1 + np.arange(s - 1, e - 1)
                total -= float(lp[r, cols, z[s:e]].sum())
        return total, len(ids)


def evaluate(
    checkpoint: str, files: list, window: int, stride: int | None = None, quantize=None
) -> dict:
    """Bits per byte of ``checkpoint`` over ``files`` (see the module docstring); quantize: an
    int8 scheme applied on loading (`from_pretrained(quantize=)`)."""
    stride = stride or window // 2
    scorer = Scorer(checkpoint, window, stride, quantize=quantize)
    start = time.perf_counter()
    per_file, nats, nbytes, ntok = [], 0.0, 0, 0
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        nll, n = scorer.nll(text)
        b = len(text.encode("utf-8"))
        per_file.append({"file": str(f), "bytes": b, "tokens": n, "bpb": nll / math.log(2) / b})
        nats, nbytes, ntok = nats + nll, nbytes + b, ntok + n
    return {
        "checkpoint": str(checkpoint),
        "quantize": quantize,
        "window": window,
        "stride": stride,
        "files": len(files),
        "bytes": nbytes,
        "tokens": ntok,
        "nats_per_token": nats / ntok,
        "bpb": nats / math.log(2) / nbytes,
        "seconds": round(time.perf_counter() - start, 1),
        "per_file": per_file,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--window", type=int, default=1024, help="Tokens per forward (train seq_len).")
    p.add_argument("--stride", type=int, default=None, help="Default: window // 2.")
    p.add_argument("--root", default=DEFAULT_ROOT, help="Standard library the list refers to.")
    p.add_argument("--files", nargs="*", default=None, help="Instead of the held-out list.")
    p.add_argument("--out", default=None, help="Append the JSON line to this file too.")
    p.add_argument(
        "--quantize",
        default=None,
        choices=("experts_int8", "int8"),
        help="Quantise the weights on loading (int8 weight-only).",
    )
    args = p.parse_args(argv)
    files = args.files or heldout_paths(args.root)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        print(f"eval_bpb: error: missing files: {missing[:3]}", file=sys.stderr)
        return 2
    row = evaluate(args.checkpoint, files, args.window, args.stride, args.quantize)
    line = json.dumps(row)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
