"""``Folded``: what stays where part of a converted FFN was computed."""

from __future__ import annotations

from torch import Tensor, nn


class Folded(nn.Module):
    """A pass-through standing where a part of an FFN was (BERT's ``output.dense``): the MoE at
    ``into`` computes that part now, and the code around it (dropout, residual, norm) is unchanged."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"into={self.into!r}"
