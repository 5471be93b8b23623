"""examples/peft_quickstart.py runs with lorakit, and (import swapped back) with peft itself."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPT = ROOT / "examples" / "peft_quickstart.py"


def _run(script: Path, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("library", ["lorakit", "peft"])
def test_quickstart_runs_with_either_import(library, tmp_path):
    source = SCRIPT.read_text()
    assert "from lorakit import" in source
    script = tmp_path / "quickstart.py"
    script.write_text(source.replace("from lorakit import", f"from {library} import"))
    out = _run(script, tmp_path)
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", out)
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert "reloaded outputs match: True" in out
    assert "merged outputs match: True" in out
