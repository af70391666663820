"""Code generation: derived statements lowered to NumPy and PyTorch source."""
