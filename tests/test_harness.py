"""The benchmark harness (#24): datasheet peaks, decode-step bytes, the device copy, device-time
parsing and its fallbacks, output checks, the forward+backward helper, MoE routing problems and
the marking of invalid result rows. Fast, CPU only."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_moe, device_time, harness, invalidate, roofline
from minimax_jax import ModelConfig

# ------------------------------------------------------------------------------ datasheet peaks


@pytest.mark.parametrize(
    "kind, name, tflops, tbps",
    [  # dense bf16 = half the datasheets' "with sparsity" figures; HBM as printed
        ("NVIDIA H200", "H200 SXM", 989.5, 4.8),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5, 4.8),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5, 3.35),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 2.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5, 3.9),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 312.0, 2.039),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312.0, 1.555),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB", 312.0, 1.935),
        ("TPU v4", "TPU v4", 275.0, 1.2),
        ("TPU v5 lite", "TPU v5e", 197.0, 0.819),
        ("TPU v5", "TPU v5p", 459.0, 2.765),
        ("TPU v6 lite", "TPU v6e", 918.0, 1.64),
    ],
)
def test_peak_table_by_device_kind(kind, name, tflops, tbps):
    peak = roofline.peak_for(kind)
    assert (peak.name, peak.bf16_tflops, peak.hbm_tbps) == (name, tflops, tbps)
    assert peak.source.startswith("https://")
    assert roofline.peak_fields(kind)["peak_bf16_tflops"] == tflops


def test_unknown_device_has_no_peak():
    assert roofline.peak_for("cpu") is None
    assert roofline.peak_fields("cpu") == {
        "peak_name": None, "peak_bf16_tflops": None, "peak_hbm_tbps": None, "peak_source": None,
    }  # fmt: skip


# --------------------------------------------------------------------------- decode-step bytes


def test_expected_distinct_experts():
    assert roofline.expected_distinct(4, 2, 1) == 2  # one token: its top-2
    assert roofline.expected_distinct(4, 2, 2) == pytest.approx(3.0)  # 4 (1 - (1/2)^2)
    assert roofline.expected_distinct(8, 2, 1000) == pytest.approx(8.0)


def test_decode_step_bytes_by_hand():
    """tiny-remote (D 64, N 4 x H 32, K 2, F 96, E 4 top-2, V 512, 7 lightning + 1 softmax
    layers, untied head, bf16; router fp32) counted by hand from its parameter shapes."""
    cfg = ModelConfig.preset("tiny-remote")
    d, n, h, kv, f, e, v = 64, 4, 32, 2, 96, 4, 512
    bf16, f32 = 2, 4
    norms = 2 * d  # input and post-attention norms
    lin_layer = (d * n * h + n * h + n * h * d + d * n * 3 * h + norms) * bf16 + d * e * f32
    soft_layer = (d * kv * h * 2 + n * h * d + d * n * h + norms) * bf16 + d * e * f32
    experts_per_layer = (e * d * 2 * f + e * f * d) * bf16
    b, context = 3, 100
    got = roofline.decode_step_bytes(cfg, b, context)
    want = {
        "weights": 7 * lin_layer + soft_layer + d * bf16,  # + the final norm
        "experts": int(8 * experts_per_layer * (e * (1 - (2 / 4) ** b)) / e),
        "embed_rows": b * d * bf16,
        "lm_head": d * v * bf16,
        "lightning_state": 2 * 7 * b * n * h * h * f32,  # read and written, fp32
        "kv_cache": b * 2 * kv * h * bf16 * (context + 1),  # read, + the new token written
        "logits": b * v * f32,
    }
    assert {k: got[k] for k in want} == want
    assert got["total"] == sum(want.values())


def test_decode_step_bytes_tied_head_reads_the_table_once():
    cfg = ModelConfig.preset("tiny-remote").replace(tie_word_embeddings=True)
    got = roofline.decode_step_bytes(cfg, 2, 10)
    assert got["embed_rows"] == 0 and got["lm_head"] == 512 * 64 * 2


# ----------------------------------------------------------------------------- the device copy


def test_device_copy_is_a_real_copy():
    x = jnp.arange(1 << 16, dtype=jnp.float32)
    hlo = roofline.device_copy.lower(x).compile().as_text()
    assert " copy(" in hlo
    y = roofline.device_copy(x)
    assert y.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_copy_bandwidth_measures_each_size():
    bw = roofline.copy_bandwidth(sizes=(1 << 20, 1 << 22), reps=3)
    assert set(bw["copy_sizes"]) == {1 << 20, 1 << 22}
    assert all(r > 0 for r in bw["copy_sizes"].values())
    assert bw["copy_GBps"] == max(bw["copy_sizes"].values())


# ------------------------------------------------------------------------------- device time


def test_split_reps_assigns_events_to_windows():
    windows = [(0, 100), (200, 300)]
    events = [(10, 30), (20, 50), (210, 240), (260, 270)]
    spans, how = device_time.split_reps(windows, events)
    assert how == "windows"
    assert spans == [(40, 40), (60, 40)]  # (first start -> last end, union of the events)


def test_split_reps_cuts_at_gaps_when_clocks_disagree():
    windows = [(0, 100), (200, 300)]  # the device clock is 10_000 ahead: no event overlaps
    events = [(10_010, 10_030), (10_040, 10_050), (10_500, 10_520)]
    flush = [(10_300, 10_400)]  # the flush between the calls is not a call
    spans, how = device_time.split_reps(windows, events, flush)
    assert how == "gap_split"
    assert spans == [(40, 30), (20, 20)]


def test_split_reps_refuses_a_span_longer_than_its_call():
    """Misaligned clocks, and an unmarked event (a flush) just before the second call: the gap
    split would fold it into that call (span 200 in a 100-long window): refused."""
    windows = [(0, 100), (1000, 1100)]
    events = [(10_010, 10_050), (10_800, 10_900), (10_950, 11_000)]
    with pytest.raises(device_time.NoDeviceEvents, match="exceeds its host window"):
        device_time.split_reps(windows, events)


def test_split_reps_refuses_too_few_groups():
    with pytest.raises(device_time.NoDeviceEvents):
        device_time.split_reps([(0, 10), (20, 30)], [(1000, 1010)])
    with pytest.raises(device_time.NoDeviceEvents):
        device_time.split_reps([(0, 10)], [])


def _work(x):
    return jnp.sin(x) @ jnp.cos(x).T


def test_profiler_timing_on_cpu_reads_the_ops():
    """CPU has no device plane: the profiler path reads the host's XLA op events; the spans are
    positive and within the wall time of the same calls."""
    x = jax.random.normal(jax.random.key(0), (256, 256))
    t = harness.time_device(jax.jit(_work), x, reps=3, warmup=1, method="profiler")
    assert t.method == "profiler_device_span_cpu_ops"
    assert 0 < t.min <= t.median <= t.max
    assert t.busy <= t.median * (1 + 1e-9) and t.median <= t.wall


def test_auto_timing_on_cpu_is_the_wall_clock(monkeypatch):
    monkeypatch.delenv("HARNESS_TIMING", raising=False)
    x = jnp.ones((64, 64))
    t = harness.time_device(jax.jit(_work), x, reps=3, warmup=1)
    assert t.method == "wall_block_until_ready" and t.median > 0
    row = t.row_ms()
    assert row["timing_method"] == "wall_block_until_ready" and row["few_reps"] is True
    assert row["l2_flush_bytes"] == 0


def test_profiler_failure_falls_back_to_the_wall_clock(monkeypatch):
    def broken(*a, **k):
        raise device_time.NoDeviceEvents("nothing on the device")

    monkeypatch.setattr(device_time, "jax_device_times", broken)
    t = harness.time_device(jax.jit(_work), jnp.ones((32, 32)), reps=2, method="profiler")
    assert t.method == "wall_block_until_ready" and "nothing on the device" in t.note
    assert t.row_ms()["timing_note"] == t.note


def test_measure_times_run_with_fresh_setup():
    made = []

    def setup():
        made.append(1)
        return jnp.full((8,), float(len(made)))

    t = harness.measure(lambda s: s * 2, setup=setup, reps=4, warmup=2, method="wall")
    assert t.reps == 4 and len(made) == 6  # one input per call, warm-up included


def test_time_torch_on_cpu_is_the_wall_clock():
    torch = pytest.importorskip("torch")
    a = torch.randn(64, 64)
    t = harness.time_torch(lambda _: a @ a, reps=3, warmup=1)
    assert t.method == "wall" and t.median > 0


# ------------------------------------------------------------------------------------- checks


def test_check_scaled_tolerance():
    ref = np.array([100.0, 0.01])
    out = np.array([100.0, 0.5])  # off by 0.49 where ref is tiny
    assert not harness.check(out, ref, atol=1e-2, rtol=1e-2)["check_ok"]
    scaled = harness.check(out, ref, atol=1e-2, rtol=1e-2, scaled=True)  # 1e-2 * 100 = 1
    assert scaled["check_ok"] and scaled["check_atol_scaled"]
    assert harness.check(out, ref, 1e-2, 1e-2, prefix="q8_")["q8_check_ok"] is False


def test_fwd_bwd_returns_the_forward_and_its_vjp():
    rs = np.random.RandomState(0)
    x, w, dy = rs.randn(8, 5), rs.randn(5, 3), rs.randn(8, 3)
    out, (dx, dw) = harness.fwd_bwd(lambda x, w: jnp.tanh(x @ w), jnp.asarray(dy))(x, w)
    y = np.tanh(x @ w)
    g = dy * (1 - y**2)  # by hand: d tanh = 1 - tanh^2
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, x.T @ g, rtol=1e-5, atol=1e-6)


def test_fwd_bwd_keeps_the_forward_a_linear_loss_drops():
    """For y = x @ w, the gradients of sum(y * dy) need no forward: XLA compiles two dots. The
    helper returns y, so its program has three (the forward's FLOPs are really spent)."""
    rs = np.random.RandomState(0)
    x, w, dy = (jnp.asarray(rs.randn(*s), jnp.float32) for s in ((64, 32), (32, 48), (64, 48)))
    linear = jax.jit(jax.grad(lambda x, w: jnp.sum(x @ w * dy), argnums=(0, 1)))
    ours = harness.fwd_bwd(lambda x, w: x @ w, dy)
    assert linear.lower(x, w).compile().as_text().count(" dot(") == 2
    assert ours.lower(x, w).compile().as_text().count(" dot(") == 3


# ------------------------------------------------------------------------------- MoE problems


def test_uniform_routing_is_exactly_balanced():
    chosen = bench_moe.routing_assignments(64, 8, 2, "uniform")
    assert chosen.shape == (64, 2) and (chosen[:, 0] != chosen[:, 1]).all()
    assert np.bincount(chosen.ravel(), minlength=8).tolist() == [16] * 8


def test_skewed_routing_overflows_the_padded_ladder():
    chosen = bench_moe.routing_assignments(4096, 32, 2, "skewed")
    assert (chosen[:, 0] != chosen[:, 1]).all()
    counts = np.bincount(chosen.ravel(), minlength=32)
    assert counts.max() / counts.mean() > 2.0  # past the padded FFN's largest capacity


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_make_problem_routes_as_asked(routing):
    params, x = bench_moe.make_problem(64, 32, 16, 8, 2, jnp.float32, routing=routing)
    _, experts, _ = bench_moe.route(x, params["router"], 2)
    want = bench_moe.routing_assignments(64, 8, 2, routing)
    np.testing.assert_array_equal(np.asarray(experts), want)


def test_gmm_check_catches_a_wrong_group():
    rs = np.random.RandomState(0)
    gs = jnp.asarray([3, 0, 9, 4], jnp.int32)
    xs = jnp.asarray(rs.randn(16, 8), jnp.float32)
    w = jnp.asarray(rs.randn(4, 8, 5), jnp.float32)
    out = jax.lax.ragged_dot(xs, w, gs)
    assert bench_moe.gmm_check(out, xs, w, gs)["check_ok"]
    bad = out.at[12:16].set(xs[12:16] @ w[2])  # the last group through the wrong expert
    assert not bench_moe.gmm_check(bad, xs, w, gs)["check_ok"]
    idx, valid = bench_moe.group_sample(gs, per=4)
    assert idx[0][valid[0]].tolist() == [0, 1, 2] and idx[3][valid[3]].tolist()[-1] == 15


# ------------------------------------------------------------------------------ invalid rows


def test_committed_invalid_rows_are_marked():
    assert invalidate.apply(check=True) == []  # nothing the rules match is left unmarked
    gmm = fs = 0
    for line in open(invalidate.RESULTS / "bench_moe.jsonl"):
        r = json.loads(line)
        if r.get("what") == "gmm" and r.get("mode") == "fwd_bwd" and not r.get("loss"):
            assert "linear in y" in r["invalid"] and r["invalid_fields"] == ["*"]
            gmm += 1
    for line in open(invalidate.RESULTS / "fullscale_x2.jsonl"):
        r = json.loads(line)
        if r.get("peak_raised") is False and r.get("planned_over_peak") is not None:
            assert "planned_over_peak" in r["invalid_fields"]
            fs += 1
    assert gmm >= 20 and fs == 4  # the rows the review named


def test_invalidate_is_idempotent(tmp_path):
    for name in ("bench_moe.jsonl", "bench_train.jsonl"):
        shutil.copy(invalidate.RESULTS / name, tmp_path / name)
    row = {"what": "gmm", "mode": "fwd_bwd", "impl": "dense", "tflops": 900.0}
    with open(tmp_path / "bench_moe.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    changed = invalidate.apply(tmp_path)
    assert changed == [f"bench_moe.jsonl:{sum(1 for _ in open(tmp_path / 'bench_moe.jsonl'))}"]
    assert invalidate.apply(tmp_path) == []
    last = json.loads(open(tmp_path / "bench_moe.jsonl").read().splitlines()[-1])
    assert last["invalid_fields"] == ["*"] and last["tflops"] == 900.0


# ------------------------------------------------------------------- the transformers anchor


@pytest.mark.torch
def test_hf_anchor_variants_decode_what_generate_decodes(tmp_path):
    """The static cache (and the step under torch.compile, traced by dynamo with the eager
    backend) decode the same greedy tokens as transformers' own generate, and those are the
    argmax of our uncached forward (fp32, tiny model with full RoPE as transformers has it)."""
    torch = pytest.importorskip("torch")
    from flax import nnx

    from experiments import bench_generate, hf_anchor
    from minimax_jax import MiniMaxForCausalLM, save_pretrained

    cfg = bench_generate.bench_config(tiny=True)
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    save_pretrained(model, str(tmp_path), schema="native")
    ref = hf_anchor.load(str(tmp_path), "cpu", torch.float32)
    b, t, new = 2, 20, 6
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    got = {}
    for variant in hf_anchor.VARIANTS:
        dec = hf_anchor.Decoder(ref, variant, b, t, new, compile_backend="eager")
        for _ in range(2):  # the second run reuses the static cache's buffers after reset()
            got[variant] = dec.decode(dec.prefill(ids)).numpy()
    for variant in hf_anchor.VARIANTS:
        np.testing.assert_array_equal(got[variant], got["generate"], err_msg=variant)
    check = bench_generate.decode_check(cfg, model.pure_params(), ids.numpy(), got["generate"])
    assert check["check_ok"] and check["argmax_mismatch_frac"] == 0.0
