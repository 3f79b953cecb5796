"""A transformers checkpoint as a conversion source: a directory (``config.json`` + safetensors,
one file or shards with an index; tokenizer files optional), or a hub id found in the local
Hugging Face cache (never downloaded).

    open_checkpoint("./llama-dense")            Checkpoint(directory, config, tensors: name → file, shape, dtype)
    meta_model(checkpoint.config, dtype)         the model class of config.architectures, built on meta;
                                                 only its non-persistent buffers (rotary inv_freq) are real
    token_inputs(config, batch=1, seq_len=16)    example inputs (token ids, on meta) for the passes

The weights stay in the files: ``moefx.artifact.streaming`` reads each tensor when it is written.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefx.artifact.format import DTYPES, INDEX, WEIGHTS, ArtifactError, TensorSpec, tensor_specs
from moefx.artifact.model_file import ACCEPTED_SOURCES

CONFIG = "config.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name"


class CheckpointError(ArtifactError):
    """A checkpoint source that cannot be found, read or built."""


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    hub_id: str | None  # the id it was found by in the Hugging Face cache, if any
    config: Any  # a transformers PretrainedConfig
    tensors: dict[str, TensorSpec]  # every tensor in the files, from their headers

    def source(self, dtype: torch.dtype) -> dict:
        """What the manifest records, enough for ``moefx.load`` to rebuild the dense model by itself."""
        return {
            "checkpoint": str(self.directory.resolve()), "hub_id": self.hub_id,
            "architecture": architecture(self.config), "dtype": str(dtype).removeprefix("torch."),
            "config": json.loads(self.config.to_json_string()),
        }


def is_checkpoint_source(source: str | Path) -> bool:
    """A directory, or something that is not a path here and reads as a hub id: not a model file."""
    path = Path(source)
    if path.is_dir():
        return True
    return not path.exists() and path.suffix != ".py" and HUB_ID.match(str(source)) is not None


def open_checkpoint(source: str | Path) -> Checkpoint:
    """The checkpoint at ``source`` (a directory or a hub id in the local cache), its config and tensors."""
    directory, hub_id = _directory(source)
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointError(problem)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{directory / CONFIG} is not a transformers config ({err}): pass a directory written "
                              "by save_pretrained") from err
    try:
        tensors = tensor_specs(directory)
    except (ArtifactError, OSError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"the weights of {directory} cannot be read ({err}): write them again with "
                              "save_pretrained") from err
    return Checkpoint(directory, hub_id, config, tensors)


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a checkpoint moefx can convert (naming the fix), or None."""
    if not (directory / CONFIG).is_file():
        return (f"{directory} has no {CONFIG}: pass a transformers checkpoint directory (written by save_pretrained), "
                "or a Python model file defining build_model()")
    if not ((directory / WEIGHTS).is_file() or (directory / INDEX).is_file()):
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        found = f" (it has {', '.join(others[:3])}: pickled weights, which moefx does not read)" if others else ""
        return (f"{directory} has no {WEIGHTS} or {INDEX}{found}: save the model with save_pretrained "
                "(safetensors, the default)")
    return None


def _directory(source: str | Path) -> tuple[Path, str | None]:
    path = Path(source)
    if path.is_dir():
        return path, None
    if path.exists():
        raise CheckpointError(f"{path} is a file but not a Python model file: pass {ACCEPTED_SOURCES}")
    if not HUB_ID.match(str(source)):
        raise CheckpointError(f"{source} not found: pass {ACCEPTED_SOURCES}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE")  # read now, not when huggingface_hub was imported
    try:
        return Path(snapshot_download(str(source), local_files_only=True, cache_dir=cache)), str(source)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as err:
        where = cache or "the default Hugging Face cache"
        raise CheckpointError(
            f"{source} is neither a path here nor a model in the local Hugging Face cache ({where}); moefx does not "
            f"download: pass {ACCEPTED_SOURCES}, or download it first (hf download {source})"
        ) from err



def architecture(config) -> str:
    names = getattr(config, "architectures", None) or []
    return names[0] if names else "AutoModelForCausalLM"


def model_class(config):
    """The class ``config.architectures`` names, else the causal-LM auto class (then the base model)."""
    transformers = _transformers()
    named = getattr(transformers, architecture(config), None)
    if named is not None:
        return named
    auto = transformers.AutoModelForCausalLM
    return auto if type(config) in auto._model_mapping else transformers.AutoModel


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The dense model of ``config`` on the meta device in ``dtype``, in eval mode, its non-persistent
    buffers computed (they are in no checkpoint file)."""
    config = copy.deepcopy(config)  # building sets fields (dtype) on the config it gets
    cls = model_class(config)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # an auto class
            model = cls.from_config(config, dtype=dtype)
        else:
            model = cls._from_config(config, dtype=dtype)
    _compute_non_persistent_buffers(model)
    return model.eval()


def meta_model_from_record(source: dict) -> nn.Module:
    """The dense model a manifest's checkpoint ``source`` records, on meta (for ``moefx.load``)."""
    return meta_model(config_from_record(source), getattr(torch, source.get("dtype") or "float32"))


def config_from_record(source: dict):
    """The transformers config a manifest's checkpoint ``source`` records."""
    data = dict(source["config"])
    return _transformers().AutoConfig.for_model(data.pop("model_type"), **data)


@torch.no_grad()
def _compute_non_persistent_buffers(model: nn.Module) -> None:
    """Non-persistent buffers, on the CPU, filled by the model's own weight init (transformers computes
    rotary frequencies there); one it leaves unfilled is an error rather than garbage."""
    owners = []
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.full_like(buffer, _sentinel(buffer.dtype), device="cpu")
                owners.append((module, name))
    for module in dict.fromkeys(m for m, _ in owners):
        model._init_weights(module)
    unfilled = [f"{type(m).__name__}.{n}" for m, n in owners
                if m._buffers[n].dtype != torch.bool and bool((m._buffers[n] == _sentinel(m._buffers[n].dtype)).any())]
    if unfilled:
        raise CheckpointError(
            f"{type(model).__name__}'s weight init does not compute the buffers {unfilled[:3]}, which checkpoints do not "
            "hold: convert from a Python model file that builds the model with from_pretrained instead"
        )


def _sentinel(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min if dtype != torch.bool else False


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The floating dtype most of the checkpoint's bytes are in (float32 if none is floating)."""
    sizes: Counter = Counter()
    for spec in checkpoint.tensors.values():
        dtype = DTYPES.get(spec.dtype)
        if dtype is not None and dtype.is_floating_point:
            sizes[dtype] += dtype.itemsize * int(torch.Size(spec.shape).numel())
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def token_inputs(config, *, batch: int = 1, seq_len: int = 16, device: str = "meta") -> tuple:
    """Token ids of shape (batch, seq_len) for a text model's forward (the passes look only at shapes)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "vocab_size", None) is None:
        raise CheckpointError(
            f"{architecture(config)} does not take token ids (its config has no vocab_size), so moefx cannot make "
            "example inputs from the config: write a Python model file with build_model() and example_inputs()"
        )
    if batch < 1 or seq_len < 1:
        raise CheckpointError(f"--batch {batch} and --seq-len {seq_len} must both be >= 1")
    return (torch.zeros(batch, seq_len, dtype=torch.long, device=device),)


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise CheckpointError("converting a transformers checkpoint needs transformers: pip install 'moefx[hf]'") from err
    return transformers
