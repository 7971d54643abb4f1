"""Verification: exact reassembly of TensorRT-LLM checkpoints and equivalence checks against the source model."""
