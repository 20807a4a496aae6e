"""optimum-edkm: train-time weight clustering (eDKM palettization) for Hugging Face models."""

__version__ = "0.1.0"
