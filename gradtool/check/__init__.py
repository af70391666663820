"""Numeric checks of derived gradients against independent oracles."""
