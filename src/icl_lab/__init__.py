"""icl-lab: developmental interpretability of in-context linear regression."""

__version__ = "0.1.0"
