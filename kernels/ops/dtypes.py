"""The compute dtype shared by the ops and the router: at least fp32, so fp64 stays fp64."""

import torch


def at_least_fp32(*dtypes: torch.dtype) -> torch.dtype:
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result
