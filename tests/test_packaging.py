"""The built wheel (tests/wheel_build.py, about 5 s): what it ships and what it must not. Its
install and every CLI run from it are checked by ``.ci/wheel_smoke``."""

from __future__ import annotations

import configparser
import email.parser
import importlib.util
import zipfile

import pytest
from wheel_build import REPO, build_wheel, source_files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    with zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("wheel"))) as zf:
        yield zf


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _git_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files git knows under ``folder`` (relative to it) with one of ``suffixes``."""
    return [
        name[len(folder) + 1 :]
        for name in source_files()
        if name.startswith(folder + "/") and name.endswith(suffixes)
    ]


def test_wheel_ships_license_py_typed_presets_templates_and_demo_model(wheel):
    names = set(wheel.namelist())
    version = _setup_cfg()["metadata"]["version"]
    dist_info = f"minimax_jax-{version}.dist-info"
    licenses = [n for n in names if n.startswith(dist_info + "/") and n.endswith("/LICENSE")]
    assert len(licenses) == 1, sorted(n for n in names if n.startswith(dist_info))
    assert wheel.read(licenses[0]) == (REPO / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0" in wheel.read(licenses[0])
    assert {"minimax_jax/py.typed", "pallas_kernels/py.typed"} <= names
    assert "minimax_jax/chat_templates/minimax-m1/tokenizer_config.json" in names
    # every data file of configs/ (presets, VL presets, mesh and run configs) and of the demo model
    data = _git_files("configs", (".json", ".yaml"))
    assert {"minimax-m1-80k.json", "vl/minimax-vl-01.json", "mesh/tp_ep.yaml"} <= set(data)
    assert {"train/demo.yaml", "train/tiny.yaml"} <= set(data)
    missing = [f"minimax_jax/configs/{n}" for n in data if f"minimax_jax/configs/{n}" not in names]
    demo = _git_files("minimax_jax/demo_model", ("",))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(demo)
    missing += [
        f"minimax_jax/demo_model/{n}" for n in demo if f"minimax_jax/demo_model/{n}" not in names
    ]
    assert not missing, missing
    assert (
        wheel.read("minimax_jax/demo_model/model.safetensors")
        == (REPO / "minimax_jax/demo_model/model.safetensors").read_bytes()
    )


def test_wheel_has_no_generic_top_level_package_and_every_module(wheel):
    names = set(wheel.namelist())
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"minimax_jax", "minimax_jax_convert", "pallas_kernels"}, top
    # every module of the checkout is in the wheel, configs/ and convert/ under the project's names
    where = {"minimax_jax": "minimax_jax", "pallas_kernels": "pallas_kernels",
             "convert": "minimax_jax_convert", "configs": "minimax_jax/configs"}  # fmt: skip
    expected = {
        f"{where[name.split('/')[0]]}/{name.split('/', 1)[1]}"
        for name in source_files()
        if name.endswith(".py") and name.split("/")[0] in where
    }
    assert "minimax_jax_convert/hf_to_orbax.py" in expected
    assert expected <= names, sorted(expected - names)


def test_wheel_metadata_version_extras_and_console_scripts(wheel):
    cfg = _setup_cfg()
    version = cfg["metadata"]["version"]
    meta = email.parser.Parser().parsestr(
        wheel.read(f"minimax_jax-{version}.dist-info/METADATA").decode()
    )
    assert meta["Version"] == version and meta["License"] == "Apache-2.0"
    assert {"test", "train", "gpu", "tpu", "plot", "wandb"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("jax[tpu]") and 'extra == "tpu"' in r for r in requires), requires
    assert any(r.startswith("matplotlib") and 'extra == "plot"' in r for r in requires)
    assert any(r.startswith("wandb") and 'extra == "wandb"' in r for r in requires)
    entry_points = configparser.ConfigParser()
    entry_points.read_string(
        wheel.read(f"minimax_jax-{version}.dist-info/entry_points.txt").decode()
    )
    scripts = dict(entry_points["console_scripts"])
    assert set(scripts) == {
        "minimax-jax-generate", "minimax-jax-train", "minimax-jax-train-tokenizer",
        "minimax-jax-info", "minimax-jax-hf-to-orbax", "minimax-jax-orbax-to-hf",
        "minimax-jax-check-logits",
    }  # fmt: skip
    for script, target in scripts.items():
        module, func = target.split(":")
        source = wheel.read(module.replace(".", "/") + ".py").decode()
        assert f"\ndef {func}(" in source, (script, target)
    # the README names every console script
    readme = (REPO / "README.md").read_text()
    assert all(f"`{script}`" in readme for script in scripts), sorted(scripts)


def test_presets_are_found_in_a_checkout_and_in_an_installed_layout(tmp_path):
    """``minimax_jax.presets`` finds ``configs/`` beside the package (a checkout) or inside it (the
    wheel's layout, imitated here: a copy of the module with its own ``configs/``)."""
    from minimax_jax import presets

    assert presets.CONFIGS_DIR == REPO / "configs"
    assert presets.preset_path("tiny-remote") == REPO / "configs" / "tiny-remote.json"
    fake = tmp_path / "site-packages" / "minimax_jax"
    (fake / "configs" / "vl").mkdir(parents=True)
    (fake / "presets.py").write_text((REPO / "minimax_jax" / "presets.py").read_text())
    (fake / "configs" / "only-here.json").write_text("{}")
    (tmp_path / "site-packages" / "configs").mkdir()  # another project's top-level configs/
    (tmp_path / "site-packages" / "configs" / "theirs.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("installed_presets", fake / "presets.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.CONFIGS_DIR == (fake / "configs").resolve()
    assert installed.list_presets() == ["only-here"]
    with pytest.raises(ValueError, match=r"unknown preset 'theirs': choose one of \['only-here'\]"):
        installed.preset_path("theirs")
