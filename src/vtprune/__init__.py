"""vtprune: visual-token pruning with debiased attention scores."""
__version__ = "0.1.0"
