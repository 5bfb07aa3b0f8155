"""Fast paths for MLA decoding (optional; the PyTorch path in `ecomla.mla.attention` is the reference)."""
