"""Packaging: every package directory is listed in pyproject.toml, and a non-editable install (no checkout on
``sys.path``) still finds the policy configs, which ship inside the package as ``kvcompress/_conf``."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_every_package_directory_is_listed() -> None:
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    found = {p for p in find_packages(str(REPO), include=["kvcompress", "kvcompress.*"]) if not p.endswith("_conf")}
    found |= {f"kvcompress_kernels{p.removeprefix('kernels')}" for p in find_packages(str(REPO), include=["kernels*"])}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert setuptools_cfg["package-dir"]["kvcompress._conf"] == "conf"


@pytest.mark.slow
def test_non_editable_install_loads_every_policy(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the venv's python runs the system pip (system site packages) and installs into the venv
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps"]
    install += ["--no-build-isolation", str(REPO)]  # a wheel build from a copy of the tree, as `pip install .` does
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = (
        "import kvcompress\n"
        "from kvcompress.experiment.policy_config import load_policy, policy_names\n"
        "names = policy_names()\n"
        "print(kvcompress.__file__)\n"
        "print(' '.join(names))\n"
        "print(type(load_policy('lfu', window=8)).__qualname__, load_policy('lfu', window=8).window)\n"
        "for name in names: load_policy(name)\n"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run([str(python), "-c", script], cwd=outside, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    where, names, lfu = run.stdout.splitlines()
    assert Path(where).is_relative_to(env_dir), f"kvcompress imported from {where}, not the installed copy"
    assert set(names.split()) >= {"full", "lfu", "snapkv", "streaming", "h2o", "tova"}
    assert lfu == "LFUPolicy 8"


def test_python_started_in_the_checkout_gets_pypi_kernels_and_ours() -> None:
    """``python -m`` / ``-c`` / a REPL in the repository root put it on ``sys.path``, where the ``kernels/`` directory
    would shadow PyPI's ``kernels`` (which transformers >= 5.25 imports): the name goes to the installed package, and
    ours still imports as ``kvcompress_kernels``."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's `kernels` is not installed here")
    script = (
        "import sys, kernels, kvcompress_kernels, transformers.activations\n"
        "print(kernels.__file__)\n"
        "print(kvcompress_kernels.paged_decode.__module__)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    hub, ours = run.stdout.splitlines()
    assert not Path(hub).is_relative_to(REPO), hub
    assert ours == "kvcompress_kernels.paged_decode"
