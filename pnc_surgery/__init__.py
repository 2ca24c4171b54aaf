"""pnc_surgery: Partial Network Cloning for timm and transformers classifiers."""
__version__ = "0.1.0"
