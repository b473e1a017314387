"""sap_jax: SAP channel pruning (structural alignment through partial regularization) in JAX."""

__version__ = "0.1.0"
