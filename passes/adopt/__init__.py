"""Existing MoE blocks (Mixtral, Qwen-MoE, DeepSeek-V3, GPT-OSS, hand-written ones) as moefx layers."""

from moefx.passes.adopt.adopt import (
    Adoption,
    AdoptionError,
    adopt_blocks,
    apply,
    block_paths,
    check_init,
    check_options,
    find_blocks,
    readopt,
    record_adoption,
    undo,
)
from moefx.passes.adopt.spec import AdoptedBlock, adopted_record

__all__ = [
    "AdoptedBlock", "Adoption", "AdoptionError", "adopt_blocks", "adopted_record", "apply", "block_paths", "check_init",
    "check_options", "find_blocks", "readopt", "record_adoption", "undo",
]
