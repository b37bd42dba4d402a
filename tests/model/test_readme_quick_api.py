"""The README's Quick API block runs exactly as printed, on the embedded model."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_api_runs_as_printed(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quick API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "quick_api.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer, accounting = proc.stdout.strip().splitlines()[-2:]
    assert "pass key" in answer.lower()  # an answer, not noise (at 8x SmolLM2 keeps only some of the digits)
    assert float(re.search(r"physical compression (\d+\.\d)x", accounting).group(1)) > 6
