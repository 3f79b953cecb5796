"""CUDA: registration of the Triton kernels for the ops, backend choice, tile tuning, torch._grouped_mm."""
