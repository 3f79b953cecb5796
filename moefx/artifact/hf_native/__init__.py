"""Native transformers MoE checkpoints (Llama -> Mixtral, Qwen2 -> Qwen2-MoE, ...) from converted models."""

from moefx.artifact.hf_native.families import FAMILIES, Family, family_of
from moefx.artifact.hf_native.layout import NativeFormatError, native_layout
from moefx.artifact.hf_native.write import write_native

__all__ = ["FAMILIES", "Family", "NativeFormatError", "family_of", "native_layout", "write_native"]
