"""Benchmark: VL-01 vision tower + projector (ours) beside transformers' CLIPVisionModel.

    PYTHONUNBUFFERED=1 PYTHONPATH=. timeout 240 python3 experiments/bench_vision.py
    python3 experiments/bench_vision.py --small --out /tmp/bv.jsonl    # CPU smoke run

Issue 8: one 1920x1080 image (synthetic, through our MiniMaxVLProcessor: 18 tiles + thumbnail =
19 tiles of 336x336) at full size (VisionConfig of configs/vl/minimax-vl-01.json: CLIP ViT-L/14 at
336, 24 layers, hidden 1024; projector 1024 -> 6144 -> 6144), bf16 random weights. Rows (JSON
lines, with device and versions), most important first (rows are written as measured, and a
driver's time cap may cut the tail):
- transformers: `CLIPVisionModel` (SDPA attention when available; `attn` says which), features =
  last_hidden_state without CLS, then a torch projector (Linear, GELU, Linear), our weights copied
  in through `minimax_jax.hf.vl_mapping.export_vision`; pixels already on the GPU (bf16);
- `minimax_jax.encode_tiles[host pixels]`: the path the model runs: host float32 pixels cast to
  bf16 on the host, exact tile count (19), `attention_impl="auto"` (the row's `attn` is what it
  resolved to; `attention_failures` lists the fused kernels that failed here and why);
- `minimax_jax._encode_tiles[device pixels, 19 tiles, attn=pallas]` / `attn=cudnn]`: the jitted
  tower + projector on device-resident bf16 pixels (like torch's), with the Pallas flash kernel
  and with cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`), the
  one "auto" resolved to first;
- attention alone (q, k, v [19, 577, 16, 64] bf16, applied 24 times in a row: the tower's whole
  attention; one application of each checked against fp32 XLA): `torch.sdpa[attention only]`,
  then `minimax_jax.vl.vision.attention[xla]` (rows
  keep that name; the function is `pallas_kernels.attention.attention`), `[pallas
  bqX bkY wW sS]` (four block / warp / stage configs of the Pallas kernel; the first is the
  default) and `[cudnn]`; `max_rel_diff_vs_fp32` of one application against fp32 XLA;
- `minimax_jax._encode_tiles[device pixels, 19 tiles]` (`attn=xla`: the materialised logits; run
  r1-x2's row name), `minimax_jax.encode_tiles[host pixels, float32 transfer]` (float32 sent,
  cast on the device), `..._encode_tiles[device pixels, 24 tiles]` (`attn=xla`, padded to 24 as
  an earlier TILE_BUCKET=8 did: run r1-x2's row);
- `..._encode_tiles[device pixels, 19 tiles, unrolled, attn=X]`: the auto-resolved attention with
  the 24 layers unrolled instead of scanned (last: the slowest compile).
A row that fails (e.g. cuDNN without execution plans on CUDA 13) is written with `error`.
ms = median of --reps timed calls after warm-up: device time per call on a GPU on both sides
(`harness.measure` / `harness.time_torch`: the profiler's kernel span, L2 flushed), except the
host-pixel rows (wall clock: the host's cast and the transfer are part of them, no ratio);
ratio = transformers ms / ours (goal >= 1); max_rel_diff = max|ours - theirs| / max|theirs| over
the projected features [19, 576, E] (mean_rel_diff: the same with means; diff_ok: max_rel_diff
< 5e-2 in bf16, 1e-4 in fp32; a full-size
bf16 tile gave 2.4e-2 on CPU), plus `experiments.harness.check`'s fields against the same
reference. The run exits after --budget_s (rows already written are kept).
--small: a tiny tower (same image and tiles) in float32, for a CPU smoke run (the fused kernels
are then run as on CPU: Pallas in interpret mode, cuDNN failing with "not detected").
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time

os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import harness  # noqa: E402
from experiments.profiling import kernel_profile, torch_profile  # noqa: E402
from minimax_jax.config import ModelConfig  # noqa: E402
from minimax_jax.hf import vl_mapping  # noqa: E402
from minimax_jax.vl import model as vl_model  # noqa: E402
from minimax_jax.vl.processor import MiniMaxVLProcessor  # noqa: E402
from minimax_jax.vl.vision import Projector, VisionConfig, VisionTower, VLConfig  # noqa: E402
from pallas_kernels.attention import attention as vit_attention  # noqa: E402
from pallas_kernels.attention.gpu import flash_attention_gpu  # noqa: E402

IMAGE_HW = (1080, 1920)
EXPECTED_TILES = 19  # 3 x 6 tiles on the 1008 x 2016 canvas + thumbnail


def bench_config(small: bool) -> VLConfig:
    if not small:
        return VLConfig.preset("minimax-vl-01")
    text = ModelConfig.preset("tiny-remote").replace(hidden_size=64, vocab_size=512)
    vis = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    return VLConfig(text=text, vision=vis, image_token_index=500)


def synthetic_pixels(cfg: VLConfig) -> np.ndarray:
    from PIL import Image  # optional dependency (the processor's)

    h, w = IMAGE_HW
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.RandomState(0).randint(0, 64, (h, w, 3))
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) * 3 // 4 + noise
    x = MiniMaxVLProcessor.from_config(cfg).preprocess(Image.fromarray(rgb.astype(np.uint8)))
    assert x.pixel_values.shape[0] == EXPECTED_TILES, (x.pixel_values.shape, x.grid)
    return x.pixel_values


def torch_reference(cfg: VLConfig, params: dict, dtype, device):
    """CLIPVisionModel + projector holding our weights -> (callable pixels -> features, attn)."""
    import torch
    import transformers

    v = cfg.vision
    hf = {k: x for k, x in v.to_hf().items() if k != "model_type"}
    ccfg = transformers.CLIPVisionConfig(**hf)
    with torch.device(device):
        try:
            clip = transformers.CLIPVisionModel._from_config(ccfg, attn_implementation="sdpa")
        except (ValueError, ImportError):
            clip = transformers.CLIPVisionModel._from_config(ccfg)
        e = cfg.text.hidden_size
        proj = torch.nn.ModuleDict(
            {"linear_1": torch.nn.Linear(v.hidden_size, e), "linear_2": torch.nn.Linear(e, e)}
        )
    clip, proj = clip.to(dtype).eval(), proj.to(dtype).eval()
    targets = {**clip.state_dict(), **{"multi_modal_projector." + k: t
                                       for k, t in proj.state_dict().items()}}  # fmt: skip
    tree = dict(params, image_newline=jnp.zeros((cfg.text.hidden_size,), jnp.float32))
    copied = 0
    with torch.no_grad():
        for name, arr in vl_mapping.export_vision(cfg, tree):
            short = name.removeprefix("vision_tower.vision_model.")
            key = next((k for k in (name, short, "vision_model." + short) if k in targets), None)
            if key is None:
                continue  # image_newline
            targets[key].copy_(torch.from_numpy(np.array(arr, np.float32)).to(dtype))
            copied += 1
    assert copied == 5 + 16 * v.num_layers + 4, copied

    def run(pixels):
        with torch.inference_mode():
            f = clip(pixel_values=pixels).last_hidden_state[:, 1:]
            out = proj["linear_2"](torch.nn.functional.gelu(proj["linear_1"](f)))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run, clip.config._attn_implementation


def rel_diff(ours, theirs) -> tuple[float, float]:
    """(max|a - b| / max|b|, mean|a - b| / mean|b|)."""
    a, b = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    d = np.abs(a - b)
    return float(d.max() / np.abs(b).max()), float(d.mean() / np.abs(b).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--small", action="store_true", help="tiny tower, float32 (CPU smoke run)")
    ap.add_argument("--reps", type=int, default=harness.DEFAULT_REPS)
    ap.add_argument("--budget_s", type=int, default=180, help="hard exit after this many s")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="only: transformers and our device-pixel tower (cuDNN attention), each "
        "with a kernel profile (experiments/profiling.py)",
    )
    args = ap.parse_args()
    # Hard limit from a watchdog thread (fires even inside a blocked device call); rows are
    # written as soon as measured, so a cut-short run keeps them.
    faulthandler.dump_traceback_later(args.budget_s, exit=True)
    t_start = time.perf_counter()

    import torch
    import transformers

    dev = jax.devices()[0]
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = jnp.float32 if args.small else jnp.bfloat16
    tdtype = torch.float32 if args.small else torch.bfloat16
    cfg = bench_config(args.small)
    v = cfg.vision
    try:  # cuDNN's version as JAX sees it (None without the CUDA plugin)
        from jax._src.lib import cuda_versions

        cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        cudnn = None
    base = {"cudnn": cudnn,
            "torch_device": torch.cuda.get_device_name() if tdev == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": jnp.dtype(dtype).name,
            "small": args.small, "image_hw": list(IMAGE_HW), "tiles": EXPECTED_TILES,
            "vision": f"L{v.num_layers} D{v.hidden_size} F{v.intermediate_size} N{v.num_heads} "
                      f"{v.image_size}/{v.patch_size}", "proj_dim": cfg.text.hidden_size,
            "reps": args.reps}  # fmt: skip

    emit = harness.Rows(args.out, bench="vision").emit

    pixels = synthetic_pixels(cfg)  # float32 [19, 3, 336, 336], thumbnail first
    rngs = nnx.Rngs(0)
    tower = VisionTower(v, rngs=rngs, dtype=dtype)
    proj = Projector(v.hidden_size, cfg.text.hidden_size, rngs=rngs, dtype=dtype)
    params = {"vision_tower": nnx.to_pure_dict(nnx.state(tower, nnx.Param)),
              "projector": nnx.to_pure_dict(nnx.state(proj, nnx.Param))}  # fmt: skip

    # transformers, same weights, same tiles, pixels resident on its device
    ref, attn = torch_reference(cfg, params, tdtype, tdev)
    tpix = torch.from_numpy(pixels).to(tdev, tdtype)
    theirs = ref(tpix).float().cpu().numpy()
    t_timing = harness.time_torch(lambda _: ref(tpix), reps=args.reps)
    t_sec = t_timing.median
    emit(base | {"impl": "transformers.CLIPVisionModel+torch_projector", "attn": attn,
                 **t_timing.row_ms(), "tiles_per_s": EXPECTED_TILES / t_sec,
                 **harness.no_check("the reference")})  # fmt: skip

    def ours_row(impl, fn, tiles_run, attn, method="auto", **extra):
        row = base | {"impl": impl, "attn": attn, "tiles_run": tiles_run, **extra}
        try:
            feats = np.asarray(jax.device_get(fn()), np.float32)[:EXPECTED_TILES]
            timing = harness.measure(lambda _: fn(), reps=args.reps, method=method)
            sec = timing.median
        except Exception as err:  # noqa: BLE001 - report and go on to the next row
            emit(row | {"error": f"{type(err).__name__}: {err}"[:1500],
                        "elapsed_s": time.perf_counter() - t_start})  # fmt: skip
            return
        diff, mean_diff = rel_diff(feats, theirs)
        tol = 1e-4 if args.small else 5e-2
        # a ratio only between like clocks: host-pixel rows time the host's work too (wall)
        ratio = t_sec / sec if method != "wall" else None
        emit(row | {**timing.row_ms(), "tiles_per_s": EXPECTED_TILES / sec, "ratio": ratio,
                    "max_rel_diff": diff, "mean_rel_diff": mean_diff, "diff_ok": diff < tol,
                    **harness.check(feats, theirs, atol=tol, rtol=tol),
                    "elapsed_s": time.perf_counter() - t_start})  # fmt: skip

    tower_p, proj_p = params["vision_tower"], params["projector"]
    old_pad = min(32, -(-EXPECTED_TILES // 8) * 8)  # TILE_BUCKET was 8: 24 tiles

    def device_row(n, attn, unroll=1, name=None):
        dpix = jax.device_put(
            np.pad(pixels, ((0, n - EXPECTED_TILES), (0, 0), (0, 0), (0, 0))).astype(dtype)
        )
        fn = lambda: vl_model._encode_tiles(v, tower_p, proj_p, dpix, None, attn, unroll)  # noqa: E731,SLF001
        name = name or f"minimax_jax._encode_tiles[device pixels, {n} tiles]"
        ours_row(name, fn, n, attn, unroll=unroll)
        if args.profile:
            emit(
                base
                | {
                    "impl": name,
                    "attn": attn,
                    "what": "profile",
                    "profile": kernel_profile(lambda: jax.block_until_ready(fn())),
                }
            )

    def fused_name(attn, unrolled=False):
        return (f"minimax_jax._encode_tiles[device pixels, {EXPECTED_TILES} tiles, "
                f"{'unrolled, ' if unrolled else ''}attn={attn}]")  # fmt: skip

    def host_row(name, **kw):
        fn = lambda: vl_model.encode_tiles(v, params, pixels, **kw)  # noqa: E731
        try:
            fn()  # resolves "auto" (and records failed kernels) before the row is labelled
        except Exception:  # noqa: BLE001 - ours_row reports it
            pass
        failures = {k[-1]: msg[:300] for k, msg in vl_model._ATTENTION_FAILED.items()}  # noqa: SLF001
        attn = vl_model.resolved_attention_impl(v, params)
        ours_row(name, fn, EXPECTED_TILES, attn, method="wall", tile_bucket=vl_model.TILE_BUCKET,
                 attention_failures=failures, **kw)  # fmt: skip
        return attn

    if args.profile:
        device_row(EXPECTED_TILES, "cudnn" if dev.platform == "gpu" else "xla")
        device_row(EXPECTED_TILES, "cudnn" if dev.platform == "gpu" else "xla", unroll=True)
        if tdev == "cuda":  # after ours: a torch profiler session first left JAX's trace empty
            emit(
                base
                | {
                    "impl": "transformers.CLIPVisionModel+torch_projector",
                    "what": "profile",
                    "profile": torch_profile(lambda: (ref(tpix), torch.cuda.synchronize())),
                }
            )
        return
    # Most important first (the driver may cut the run short): the model's path, then the same
    # jitted call on device pixels for each fused attention (the resolved one first).
    auto = host_row("minimax_jax.encode_tiles[host pixels]")
    for attn in sorted(("pallas", "cudnn"), key=lambda a: a != auto):
        device_row(EXPECTED_TILES, attn, name=fused_name(attn))
    # Attention alone: one layer's q, k, v [19, 577, 16, 64] (bf16), run num_layers times in a row
    # (ms = the tower's whole attention); torch SDPA first, then ours with cuDNN last.
    rs = np.random.RandomState(1)
    shape = (EXPECTED_TILES, v.num_patches + 1, v.num_heads, v.head_dim)
    qkv32 = [jnp.asarray(rs.randn(*shape), jnp.float32) for _ in range(3)]
    with jax.default_matmul_precision("highest"):
        ref_o = np.asarray(vit_attention(*qkv32, "xla"))  # fp32, one application
    qkv = [t.astype(dtype) for t in qkv32]
    att_base = base | {"shape_bsnh": list(shape), "layers": v.num_layers}
    try:
        tq, tk, tv = (torch.from_numpy(np.array(t, np.float32)).to(tdev, tdtype)
                      .transpose(1, 2).contiguous() for t in qkv32)  # fmt: skip
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_att(_=None, layers=v.num_layers):
            with torch.inference_mode():
                o = tq
                for _ in range(layers):
                    o = sdpa(o, tk, tv)
            return o

        one = torch_att(layers=1).transpose(1, 2).float().cpu().numpy()
        checked = harness.check(one, ref_o, atol=2e-2, rtol=2e-2)
        t_ = harness.time_torch(torch_att, reps=args.reps)
        sec = t_.median
        emit(att_base | {"impl": "torch.sdpa[attention only]", **t_.row_ms(), **checked})
        t_att = sec
    except Exception as err:  # noqa: BLE001
        emit(att_base | {"impl": "torch.sdpa[attention only]", "error": repr(err)[:1500]})
        t_att = None

    def attention_row(label, fn1):
        chain = jax.jit(lambda q, k, w: jax.lax.fori_loop(
            0, v.num_layers, lambda i, o: fn1(o, k, w), q))  # fmt: skip
        row = att_base | {"impl": f"minimax_jax.vl.vision.attention[{label}]"}
        try:
            one = np.asarray(jax.jit(fn1)(*qkv), np.float32)
            t_ = harness.time_device(chain, *qkv, reps=args.reps)
        except Exception as err:  # noqa: BLE001
            emit(row | {"error": f"{type(err).__name__}: {err}"[:1500]})
            return
        sec = t_.median
        diff = float(np.abs(one - ref_o).max() / np.abs(ref_o).max())
        emit(row | {**t_.row_ms(), "ratio": (t_att / sec) if t_att else None,
                    "max_rel_diff_vs_fp32": diff,
                    **harness.check(one, ref_o, atol=2e-2, rtol=2e-2)})  # fmt: skip

    attention_row("xla", lambda q, k, w: vit_attention(q, k, w, "xla"))
    for bq, bk, warps, stages in ((128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2),
                                  (128, 128, 8, 2)):  # fmt: skip
        attention_row(
            f"pallas bq{bq} bk{bk} w{warps} s{stages}",
            lambda q, k, w, c=(bq, bk, warps, stages): flash_attention_gpu(
                q, k, w, scale=v.head_dim**-0.5, block_q=c[0], block_k=c[1], num_warps=c[2],
                num_stages=c[3]),
        )  # fmt: skip
    attention_row("cudnn", lambda q, k, w: vit_attention(q, k, w, "cudnn"))

    device_row(EXPECTED_TILES, "xla")  # run r1's row (its attention), exact tile count
    host_row("minimax_jax.encode_tiles[host pixels, float32 transfer]", cast_on_host=False)
    device_row(old_pad, "xla")  # run r1's row, padded as TILE_BUCKET=8 did
    device_row(EXPECTED_TILES, auto, unroll=True, name=fused_name(auto, True))  # slowest compile
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
