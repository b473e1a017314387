"""Reproducible studies built on sap_jax (see experiments/alignment_study.py)."""
