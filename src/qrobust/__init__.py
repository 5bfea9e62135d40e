"""qrobust: security of quantized neural networks (extraction, patches, white-box attacks)."""

__version__ = "0.1.0"
