"""The spec language: declarations, loading, validation and the built-in registry."""

from gradtool.spec.lang import Spec
from gradtool.spec.loader import builtin_specs, load_spec

__all__ = ["Spec", "load_spec", "builtin_specs"]
