"""Inference layers of compressed models (modeling_sola.py is also written into every output)."""
