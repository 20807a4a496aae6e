"""The package version (one constant; ``optimum_edkm.__version__`` re-exports it)."""

__version__ = "0.3.0"
