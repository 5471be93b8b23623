"""The package surface: light import, and the README's MiniLM demo on the real pretrained model."""
import importlib.util
import subprocess
import sys

import pytest

from helpers import ROOT


def test_import_lorakit_loads_no_heavy_libraries():
    code = ("import sys, lorakit; heavy = [m for m in ('transformers', 'peft', 'datasets') if m in sys.modules];"
            "print(heavy); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_minilm_demo_trains_saves_reloads_and_merges(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("minilm_demo", ROOT / "examples" / "minilm_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main(str(tmp_path / "adapter"))
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.safetensors"]
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0] / 10
    reload_diff = float(out.split("reloaded adapter matches: max |diff| = ")[1].split()[0])
    merged_diff = float(out.split("matches: max |diff| = ")[-1].split()[0])
    assert reload_diff == 0.0
    assert merged_diff < 1e-5
