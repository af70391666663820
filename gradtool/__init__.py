"""gradtool: derive, check and train on backward passes written once as math in SymPy."""

__version__ = "0.1.0"
