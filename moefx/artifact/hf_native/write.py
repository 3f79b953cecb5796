"""``write_native``: a converted transformers model as its native MoE family's checkpoint.

    out/
      config.json                           the MoE family's config (experts, top-k, ...)
      model.safetensors                     or model-0000k-of-0000N.safetensors + model.safetensors.index.json
      generation_config.json                copied from the source checkpoint (or the model's own)
      tokenizer files                       copied from the source checkpoint, when given

``AutoModelForCausalLM.from_pretrained(out)`` loads it with no moefx import and no remote code.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from moefx.artifact.atomic import atomic_directory
from moefx.artifact.hf_native.layout import NativeFormatError, native_layout
from moefx.artifact.hf_native.plan import native_plan
from moefx.artifact.shards import PlannedTensor, parse_size, planned, write_shards
from moefx.artifact.tensors import unwrap

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_SHARD_SIZE = "5GB"  # the hub's usual shard size (save_pretrained's default is 50GB)
# A tokenizer's files, whichever kind it is (save_pretrained's names; chat templates included).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)


def write_native(
    model: nn.Module, out_dir: str | Path, *, plan: Sequence[PlannedTensor] | None = None,
    max_shard_size: int | str | None = None, source_dir: str | Path | None = None, force: bool = False,
) -> Path:
    """Write ``model`` (a converted transformers model) to ``out_dir`` as its native MoE family
    (``families.FAMILIES``: Llama and Mistral -> Mixtral, Qwen2 -> Qwen2-MoE, ...), atomically.

    ``plan`` gives its tensors under ``model.state_dict()`` names, made when written (the streaming
    path; ``model`` may then be on meta); by default the model's own. ``max_shard_size`` (bytes or
    "5GB", as ``save_pretrained`` takes; default 5GB) cuts the weights into hub-style shards.
    ``source_dir`` is the dense checkpoint to copy the tokenizer and generation config from.
    ``force`` replaces an earlier output (a directory holding config.json). Raises
    ``NativeFormatError`` when the family cannot express the model, naming what and the way out.
    """
    model = unwrap(model)
    layout = native_layout(model)
    if plan is None:
        plan = _own_tensors(model)
    tensors = native_plan(plan, layout)
    shard_bytes = parse_size(DEFAULT_SHARD_SIZE if max_shard_size is None else max_shard_size)
    with atomic_directory(out_dir, force=force, marker=CONFIG) as tmp:
        write_shards(tensors, tmp, max_shard_bytes=shard_bytes, metadata={"format": "pt"})
        layout.config.to_json_file(tmp / CONFIG, use_diff=True)
        copy_side_files(model, source_dir, tmp)
    return Path(out_dir)


def copy_side_files(model: nn.Module, source_dir: str | Path | None, target: Path) -> None:
    """The tokenizer files and generation config of ``source_dir``; without one there, the
    model's own generation config (when it has one)."""
    source = Path(source_dir) if source_dir is not None else None
    if source is not None and not source.is_dir():
        raise FileNotFoundError(f"source_dir {source} is not a directory: pass the dense checkpoint's directory")
    for name in TOKENIZER_FILES + (GENERATION_CONFIG,):
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    generation = getattr(model, "generation_config", None)
    if not (target / GENERATION_CONFIG).exists() and generation is not None:
        generation.to_json_file(target / GENERATION_CONFIG)


def _own_tensors(model: nn.Module) -> list[PlannedTensor]:
    tensors = []
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise NativeFormatError(f"{name} is on the meta device: pass plan= (the streaming path) or load the weights first")
        tensors.append(planned(name, tensor))
    return tensors
