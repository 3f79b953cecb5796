"""Inference beyond device memory: offload (the entry point), offloaded experts, the expert cache and store."""
