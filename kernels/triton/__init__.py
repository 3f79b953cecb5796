"""The Triton kernels (grouped and fused linears, route); imported only where triton is installed."""
