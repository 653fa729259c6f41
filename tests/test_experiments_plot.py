"""experiments/plot.py: every topic's figure renders from the committed rows, its points are the
rows' values (as RESULTS.md quotes them), and RESULTS.md links the committed PNGs."""

import importlib.util
import os
import re
import sys

import pytest

pytest.importorskip("matplotlib", reason="matplotlib (extra plot) is not installed")

REPO = os.path.join(os.path.dirname(__file__), "..")
_spec = importlib.util.spec_from_file_location(
    "experiments_plot", os.path.join(REPO, "experiments", "plot.py")
)
plot = importlib.util.module_from_spec(_spec)
sys.modules["experiments_plot"] = plot
_spec.loader.exec_module(plot)


@pytest.fixture(scope="module")
def rows():
    return plot.load(os.path.join(REPO, "experiments", "results"))


def _close(fig):
    plot.pyplot().close(fig)


def test_figures_hold_the_committed_numbers(rows):
    """Spot checks against the numbers RESULTS.md quotes from the same rows: lightning fwd+bwd
    1.30x / 1.37x FLA and fwd 1.06x at T128K (run final); decode 1077 / 6757 tok/s vs 48.9 / 669
    (run r11-x2); the padded MoE layer 0.746 / 0.878 of dense forward at 4K / 64K; 1M-token
    hybrid prefill 20.24 us/token; MFU 29.5% / 23.9%."""
    fig = plot.kernels(rows)
    fwd, fwd_bwd = [c.datavalues.tolist() for c in fig.axes[0].containers]
    assert [round(v, 2) for v in fwd_bwd] == [1.30, 1.19, 1.30, 1.37]
    assert round(fwd[3], 2) == 1.06
    _close(fig)

    fig = plot.decode(rows)
    ours, hf = fig.axes[0].lines[:2]
    assert ours.get_xdata().tolist() == [1, 16] and "r11-x2" in fig.axes[0].get_title()
    assert [round(v) for v in ours.get_ydata()] == [1077, 6757]
    assert [round(v, 1) for v in hf.get_ydata()] == [48.9, 669.0]
    _close(fig)

    fig = plot.moe(rows)
    padded_fwd = next(ln for ln in fig.axes[0].lines if ln.get_label() == "padded fwd")
    assert padded_fwd.get_xdata().tolist() == [4096, 16384, 65536]
    assert [round(v, 3) for v in padded_fwd.get_ydata()] == [0.746, 0.856, 0.878]
    _close(fig)

    fig = plot.prefill(rows)
    cudnn = next(ln for ln in fig.axes[0].lines if "hybrid, run r2-h100-cudnn" in ln.get_label())
    assert cudnn.get_xdata().tolist()[-1] == 2**20 and round(cudnn.get_ydata()[-1], 2) == 20.24
    _close(fig)

    fig = plot.training(rows)
    assert [round(p.get_height(), 1) for p in fig.axes[0].patches] == [29.5, 23.9]
    _close(fig)


def test_main_writes_every_topic_and_results_md_links_them(tmp_path, capsys):
    written = plot.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in plot.FIGURES)
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert capsys.readouterr().out.count("wrote ") == len(plot.FIGURES)
    committed = os.path.join(REPO, "experiments", "results", "plots")
    text = open(os.path.join(REPO, "experiments", "RESULTS.md")).read()
    links = set(re.findall(r"\]\((results/plots/[a-z_]+\.png)\)", text))
    assert links == {f"results/plots/{n}.png" for n in plot.FIGURES}
    for link in links:
        assert os.path.isfile(os.path.join(REPO, "experiments", link)), link
    assert sorted(os.listdir(committed)) == sorted(f"{n}.png" for n in plot.FIGURES)
