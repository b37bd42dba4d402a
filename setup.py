"""Package discovery only; all metadata lives in pyproject.toml.

`kernels/` is installed under the import name `kvcompress_kernels` (see pyproject's package-dir), which
pyproject's declarative `find` cannot express together with the `kvcompress.*` subpackages.
"""

from setuptools import find_packages, setup

kernel_subpackages = [f"kvcompress_kernels.{p}" for p in find_packages("kernels")]
setup(packages=find_packages(include=["kvcompress", "kvcompress.*"]) + ["kvcompress_kernels", *kernel_subpackages])
