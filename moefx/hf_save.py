"""A converted transformers model's own ``save_pretrained`` (and so every Trainer checkpoint) writes
something that loads back as the MoE model, never as the dense one with random MLPs.

    model = moefx.moefy(llama, ...)        # type(model) is LlamaForCausalLM' (a subclass for this object)
    model.save_pretrained(d)               # native family (Mixtral): AutoModelForCausalLM.from_pretrained(d)
                                           # otherwise moefx's format: from_pretrained(d) refuses, naming
                                           # moefx.load; moefx.load(d) rebuilds it (it needs no model)

The method is installed on the converted object alone, as a subclass made for it (as
``passes/inline/subclass.py`` changes single modules): transformers' classes are not touched, and
``isinstance(model, LlamaForCausalLM)`` still holds. Its ``load_state_dict`` reads the native names
back (``hf_native/reverse.py``), so a Trainer resumes from its own checkpoints. ``moefy`` and ``load`` of the ``moefx``
package install it (``moefx.moefy`` wraps ``passes.driver.moefy``, which may not import artifact).

Why the moefx directory refuses: its config.json is the dense model's with ``dtype`` set to a
sentence naming ``moefx.load``, and that sentence as the one key of ``id2label``. Building the
config (the dense class or an Auto class) resolves ``dtype`` when ``from_pretrained`` is given
none, and turns ``id2label``'s keys into ints in every case (``dtype=`` given too): either fails
with the sentence in its error, before any weight is read. The real values are kept under
``"moefx"``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from torch import nn

from moefx.artifact.format import INDEX, MANIFEST, PLAIN_WEIGHTS, WEIGHTS
from moefx.artifact.hf_native import NativeFormatError, write_native
from moefx.artifact.hf_native.reverse import load_native_tensors
from moefx.artifact.hf_native.write import CONFIG, copy_side_files
from moefx.artifact.load import load as _load
from moefx.artifact.save import save
from moefx.artifact.shards import planned
from moefx.model import is_expert_parallel
from moefx.passes.driver import moefy as _moefy

logger = logging.getLogger(__name__)

MODEL_FILE = "moefx_model.py"  # the builder moefx.load runs: the dense model, from config.json
_SAVING_BASE = "_moefx_saving_base"  # set on the subclasses made here: the class they extend
_WEIGHT_FILES = (WEIGHTS, INDEX, PLAIN_WEIGHTS, MANIFEST, MODEL_FILE, "pytorch_model.bin", "pytorch_model.bin.index.json")
_BUILDER = '''"""Written by moefx with this checkpoint: the dense model it was converted from, built on the meta
device from config.json, in eval mode as from_pretrained gives it; moefx.load(this directory) converts
it again and fills in the saved weights."""

import json
from pathlib import Path

import torch
import transformers


def build_model():
    fields = json.loads((Path(__file__).parent / "config.json").read_text())
    recorded = fields.pop("moefx")
    dtype = recorded["dtype"]
    fields["id2label"] = recorded["id2label"]  # the refusal's place: the real value is recorded
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **{**fields, "dtype": dtype})
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])._from_config(config, dtype=getattr(torch, dtype))
    return model.eval()
'''


def install_native_save(model: nn.Module) -> nn.Module:
    """Give ``model`` (a converted transformers model) the ``save_pretrained`` described above;
    any other module is returned as it is. Returns ``model``."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return model  # not a transformers model (and transformers not even imported)
    if getattr(type(model), _SAVING_BASE, None) is None:
        model.__class__ = _saving_class(type(model))
    return model


@functools.cache
def _saving_class(base: type) -> type:
    namespace = {"save_pretrained": save_pretrained, "load_state_dict": load_state_dict, "__reduce_ex__": _reduce_ex, _SAVING_BASE: base,
                 "__module__": base.__module__, "__qualname__": base.__qualname__}
    return type(base.__name__, (base,), namespace)


def _reduce_ex(self, protocol):
    """Pickled (or copied) as the transformers class and the state, the method put back on load."""
    return _new_saving, (getattr(type(self), _SAVING_BASE),), self.__getstate__()


def _new_saving(base: type) -> nn.Module:
    return base.__new__(_saving_class(base))


def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                    push_to_hub: bool = False, max_shard_size: int | str | None = None, **kwargs) -> None:
    """Write this converted model to ``save_directory`` as its native transformers MoE family
    (``moefx.artifact.hf_native``) where the family can express it, else in moefx's format, which
    ``moefx.load(save_directory)`` reads and transformers refuses to load as the dense model.
    Files of an earlier save there are replaced; other files are left. ``state_dict`` (as Trainer
    passes it) gives the tensors; ``safe_serialization`` and other keywords of transformers'
    method are accepted and have no effect (the weights are always safetensors)."""
    if push_to_hub:
        raise ValueError("moefx's save_pretrained does not push to the hub: save locally, then upload the directory "
                         "(huggingface_hub.upload_folder)")
    if not is_main_process:
        return
    if is_expert_parallel(self):  # its experts are spread over the ranks: this process holds its own only
        raise ValueError(f"{type(self).__name__} is expert-parallel: save it with moefx.save(model, dir) called on every "
                         "rank together (moefx.load reads it back), not with save_pretrained on one")
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a directory: pass a directory to save_pretrained")
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".moefx-save-", dir=target))  # same filesystem: files move by rename
    try:
        out = staging / "out"
        plan = None if state_dict is None else [planned(name, t) for name, t in state_dict.items()]
        try:
            write_native(self, out, plan=plan, max_shard_size=max_shard_size)
        except NativeFormatError as err:
            logger.warning("%s is saved in moefx's format, which transformers refuses to load as %s; load it with "
                           "moefx.load(%r). (No native MoE format: %s)", target, type(self).__name__, str(target), err)
            _write_moefx(self, out, target)
        for stale in _WEIGHT_FILES:  # an earlier save's weights, in either format
            (target / stale).unlink(missing_ok=True)
        for stale in target.glob("model-*-of-*.safetensors"):
            stale.unlink()
        for file in sorted(out.iterdir()):
            os.replace(file, target / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
    """``nn.Module.load_state_dict``, reading the native names ``save_pretrained`` wrote too (a
    Trainer resuming from its checkpoint): their expert slices are copied into the stacks in place."""
    rest, loaded = load_native_tensors(self, state_dict)
    base = getattr(type(self), _SAVING_BASE)
    result = base.load_state_dict(self, rest, strict=False, assign=assign)
    missing = [name for name in result.missing_keys if name not in loaded]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing[:6]}, "
                           f"unexpected keys {list(result.unexpected_keys)[:6]}")
    return type(result)(missing, result.unexpected_keys)


def _write_moefx(model: nn.Module, out: Path, target: Path) -> None:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    save(model, out, source={"file": str((target / MODEL_FILE).absolute()), "entry": "build_model"})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["source"]["file_from_output"] = MODEL_FILE  # the builder moves with the directory
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / MODEL_FILE).write_text(_BUILDER)
    refusal = (f"this directory holds a moefx checkpoint: its {type(model).__name__} has MoE layers in place of "
               f"MLPs, which transformers cannot build; load it with moefx.load({str(target)!r})")
    architecture = getattr(type(model), _SAVING_BASE, type(model)).__name__  # as save_pretrained records it
    config = model.config.to_dict()
    # Both fields carry the refusal: dtype is resolved when from_pretrained is given none, and every
    # config class converts id2label's keys to int (also when a dtype is given).
    fields = {**config, "architectures": [architecture], "dtype": refusal, "id2label": {refusal: "moefx"},
              "moefx": {"dtype": dtype, "id2label": config.get("id2label"), "load": "moefx.load(directory)"}}
    (out / CONFIG).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    copy_side_files(model, None, out)


@functools.wraps(_moefy)
def moefy(model: nn.Module, *args, **kwargs) -> nn.Module:
    return install_native_save(_moefy(model, *args, **kwargs))  # then a transformers model saves as an MoE


@functools.wraps(_load)
def load(out_dir, model: nn.Module | None = None, **kwargs) -> nn.Module:
    return install_native_save(_load(out_dir, model, **kwargs))
