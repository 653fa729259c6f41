"""Benchmark: VL-01 vision tower + projector (ours) beside transformers' CLIPVisionModel.

    PYTHONUNBUFFERED=1 PYTHONPATH=. timeout 240 python3 experiments/bench_vision.py
    python3 experiments/bench_vision.py --small --out /tmp/bv.jsonl    # CPU smoke run

Issue 8: one 1920x1080 image (synthetic, through our MiniMaxVLProcessor: 18 tiles + thumbnail =
19 tiles of 336x336) at full size (VisionConfig of configs/vl/minimax-vl-01.json: CLIP ViT-L/14 at
336, 24 layers, hidden 1024; projector 1024 -> 6144 -> 6144), bf16 random weights. Rows (JSON
lines, with device and versions):
- transformers: `CLIPVisionModel` (SDPA attention when available; `attn` says which), features =
  last_hidden_state without CLS, then a torch projector (Linear, GELU, Linear), our weights copied
  in through `convert.vl_mapping.export_vision`; pixels already on the GPU;
- minimax_jax.encode_tiles: the path the model runs (host float32 pixels in, tile batch padded to
  a multiple of TILE_BUCKET, i.e. 24 tiles, one jitted call); plus the same jitted function on
  device-resident pixels, padded (24) and exact (19), to split transfer and padding costs.
ms = median of --reps timed calls after warm-up, synchronised; ratio = transformers ms / ours (goal
>= 1); max_rel_diff = max|ours - theirs| / max|theirs| over the projected features [19, 576, E]
(mean_rel_diff: the same with means; diff_ok: max_rel_diff < 5e-2 in bf16, 1e-4 in fp32; a full-size
bf16 tile gave 2.4e-2 on CPU). The run exits after --budget_s (rows already written are kept).
--small: a tiny tower (same image and tiles) in float32, for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time

os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from convert import vl_mapping  # noqa: E402
from minimax_jax import vl_model  # noqa: E402
from minimax_jax.config import ModelConfig  # noqa: E402
from minimax_jax.processor import MiniMaxVLProcessor  # noqa: E402
from minimax_jax.vision import Projector, VisionConfig, VisionTower, VLConfig  # noqa: E402

IMAGE_HW = (1080, 1920)
EXPECTED_TILES = 19  # 3 x 6 tiles on the 1008 x 2016 canvas + thumbnail


def bench_config(small: bool) -> VLConfig:
    if not small:
        return VLConfig.preset("minimax-vl-01")
    text = ModelConfig.preset("tiny-remote").replace(hidden_size=64, vocab_size=512)
    vis = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    return VLConfig(text=text, vision=vis, image_token_index=500)


def timed(fn, reps: int) -> float:
    """Median seconds of fn() (which must synchronise) after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_pixels(cfg: VLConfig) -> np.ndarray:
    from PIL import Image

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
    ap.add_argument("--out", default="experiments/results/bench_vision.jsonl")
    ap.add_argument("--small", action="store_true", help="tiny tower, float32 (CPU smoke run)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget_s", type=int, default=180, help="hard exit after this many s")
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
    base = {"bench": "vision", "device": dev.device_kind, "platform": dev.platform,
            "torch_device": torch.cuda.get_device_name() if tdev == "cuda" else "cpu",
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": jnp.dtype(dtype).name,
            "small": args.small, "image_hw": list(IMAGE_HW), "tiles": EXPECTED_TILES,
            "vision": f"L{v.num_layers} D{v.hidden_size} F{v.intermediate_size} N{v.num_heads} "
                      f"{v.image_size}/{v.patch_size}", "proj_dim": cfg.text.hidden_size,
            "reps": args.reps}  # fmt: skip

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

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
    t_sec = timed(lambda: ref(tpix), args.reps)
    emit(base | {"impl": "transformers.CLIPVisionModel+torch_projector", "attn": attn,
                 "ms": t_sec * 1e3, "tiles_per_s": EXPECTED_TILES / t_sec})  # fmt: skip

    def ours_row(impl, fn, tiles_run):
        feats = np.asarray(jax.device_get(fn()), np.float32)[:EXPECTED_TILES]
        sec = timed(lambda: jax.block_until_ready(fn()), args.reps)
        diff, mean_diff = rel_diff(feats, theirs)
        emit(base | {"impl": impl, "tiles_run": tiles_run, "ms": sec * 1e3,
                     "tiles_per_s": EXPECTED_TILES / sec, "ratio": t_sec / sec,
                     "max_rel_diff": diff, "mean_rel_diff": mean_diff,
                     "diff_ok": diff < (1e-4 if args.small else 5e-2),
                     "elapsed_s": time.perf_counter() - t_start})  # fmt: skip

    pad = min(32, -(-EXPECTED_TILES // vl_model.TILE_BUCKET) * vl_model.TILE_BUCKET)
    ours_row(
        "minimax_jax.encode_tiles[host pixels]",
        lambda: vl_model.encode_tiles(v, params, pixels),
        pad,
    )
    tower_p, proj_p = params["vision_tower"], params["projector"]
    for n in (pad, EXPECTED_TILES):
        dpix = jax.device_put(np.pad(pixels, ((0, n - EXPECTED_TILES), (0, 0), (0, 0), (0, 0))))
        ours_row(
            f"minimax_jax._encode_tiles[device pixels, {n} tiles]",
            lambda x=dpix: vl_model._encode_tiles(v, tower_p, proj_p, x, None),  # noqa: SLF001
            n,
        )
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
