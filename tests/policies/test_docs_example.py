"""The worked example of docs/POLICIES.md: a new policy from one new file plus one yaml, nothing else edited."""

import re
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.generate import generate


def test_worked_example_policy_runs(tiny_llama, tmp_path, monkeypatch) -> None:
    doc = Path("docs/POLICIES.md").read_text()
    python = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    yaml = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    # a user package standing in for kvcompress/policies/vnorm.py, so the repo itself stays untouched
    pkg = tmp_path / "userpolicies"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "vnorm.py").write_text(python)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = OmegaConf.create(yaml.replace("kvcompress.policies.vnorm", "userpolicies.vnorm"))
    policy = instantiate(cfg)
    assert type(policy).__name__ == "VnormPolicy"
    comp = Compressor(policy, Budget(ratio=4, protected_window=4, allocation="adakv"))
    out = generate(tiny_llama, [list(range(3, 103))], comp, max_new_tokens=3)
    assert out[0].memory.logical_compression >= 3.9
    sys.modules.pop("userpolicies.vnorm", None)
