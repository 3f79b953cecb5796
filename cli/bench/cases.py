"""What the benchmark compares: the shapes, the implementations' names and one (shape, impl)'s Result."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d: int
    h: int
    experts: int
    top_k: int

    def describe(self) -> str:
        return f"T={self.tokens} d={self.d} h={self.h} E={self.experts} k={self.top_k}"


SHAPES = {
    "S1": Shape("S1", tokens=4096, d=512, h=1024, experts=8, top_k=2),
    "S2": Shape("S2", tokens=4096, d=512, h=128, experts=64, top_k=8),  # fine-grained experts
    # The GPU issue's shapes (bf16 on a GPU; far too slow for a 2-core CPU).
    "mixtral": Shape("mixtral", tokens=16384, d=4096, h=14336, experts=8, top_k=2),
    "deepseek": Shape("deepseek", tokens=16384, d=7168, h=2048, experts=64, top_k=8),
}
DEFAULT_SHAPES = ("S1", "S2")
IMPLS = ("moefx", "moefx_permuted", "moefx_ref", "hf_eager", "hf_grouped_mm", "dense")
MOEFX_VARIANTS = ("moefx_permuted", "moefx_ref")  # share moefx's module
HF_IMPLS = ("hf_eager", "hf_grouped_mm")


@dataclass
class Result:
    shape: str
    impl: str
    times_ms: list[float] = field(default_factory=list)  # forward + backward
    forward_ms: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    skipped: str | None = None
    note: str = ""
    checked_against: str | None = None  # the impl whose output and input gradient these are compared with
    out_err: float | None = None  # ‖out − out_ref‖ / ‖out_ref‖
    dx_err: float | None = None  # the same for the input gradient

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def median_forward_ms(self) -> float | None:
        return statistics.median(self.forward_ms) if self.forward_ms else None

    @property
    def median_peak_mib(self) -> float | None:
        return statistics.median(self.peak_mib) if self.peak_mib else None
