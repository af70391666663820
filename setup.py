"""Package list only; everything else is in pyproject.toml.

``specs/`` (the built-in specs) is installed as ``gradtool.builtin_specs`` through the
``package-dir`` mapping in pyproject.toml; ``packages.find`` cannot discover it there.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["gradtool", "gradtool.*"]), "gradtool.builtin_specs"])
