"""Training checkpoints that survive a lost rank: ``moefx.save_training_state`` writes the model,
the optimizer state, the step and the data position; ``moefx.resume_training_state`` finds the
newest complete one and loads it back.

    checkpoint_dir/
      step-000000020/                    one directory per checkpoint, renamed into place when whole
        model-*.safetensors (+ index)    "model.<name>" and "optimizer.<param name>.<state>" tensors
        training_state.json              written last: step, data position, optimizer hyperparameters
      .step-000000030.tmp-xxxx/          a save that died (SIGKILL): never read, removed on resume

With a process group of several ranks both are collective (every rank calls them, the directory on
a filesystem they all see): the tensors go through ``moefx.parallel.checkpoint``'s DCP protocol,
expert shards and their optimizer states as shards, so a checkpoint loads at another EP size too.
A single process writes one safetensors file. Only a ``step-N`` directory holding
``training_state.json`` is ever picked, so a torn checkpoint is skipped. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn

from moefx.artifact.atomic import atomic_directory
from moefx.artifact.format import DTYPES, WEIGHTS, read_tensors, tensor_specs
from moefx.artifact.tensors import unwrap
from moefx.model import named_tensors
from moefx.parallel.checkpoint import (
    as_global,
    check_in,
    load_distributed,
    split_plain,
    write_collectively,
    write_plain,
)

log = logging.getLogger(__name__)

MARKER = "training_state.json"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class TrainingState:
    """What ``resume_training_state`` found: ``step`` and ``data_position`` as they were saved."""

    step: int
    data_position: object  # as saved (any JSON value)
    directory: Path


def save_training_state(checkpoint_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        *, step: int, data_position: object = None, keep: int | None = None) -> Path:
    """Write ``checkpoint_dir/step-<step>`` atomically; returns it. ``step`` is the caller's count
    (steps done, say) and orders the checkpoints. On several ranks every rank calls it.
    ``data_position`` is any JSON value that lets the data loader go on where it was (a batch
    count, an epoch and offset). ``keep=N`` removes all but the N newest checkpoints."""
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"step={step!r} must be an integer >= 0 (the steps done, which names the checkpoint)")
    if keep is not None and not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"keep={keep!r} must be None (keep every checkpoint) or an integer >= 1")
    model = unwrap(model)
    model_tensors = {f"model.{name}": t.detach() for name, t in named_tensors(model)}
    optim_tensors, owners, optim_record = _optimizer_state(model, optimizer)
    record = {"format": FORMAT, "step": step, "data_position": data_position, "optimizer": optim_record}
    try:
        record_text = json.dumps(record, indent=2) + "\n"
    except TypeError as err:
        raise ValueError(f"data_position and the optimizer's hyperparameters must be JSON values: {err}") from err
    target = Path(checkpoint_dir).absolute() / f"step-{step:09d}"
    tensors = {**model_tensors, **optim_tensors}
    owners = {**{key: key.removeprefix("model.") for key in model_tensors}, **owners}
    if _distributed():
        check_in("moefx.save_training_state")
        if dist.get_rank() == 0:
            _remove_torn(target)
        state, plain = split_plain(as_global(model, tensors, owners))

        def finish(tmp: Path) -> None:  # rank 0, once every shard is written; the marker last
            if plain:
                write_plain(tmp, plain)
            (tmp / MARKER).write_text(record_text)

        write_collectively(target, state, finish, force=True, marker=MARKER)
    else:
        _remove_torn(target)
        with atomic_directory(target, force=True, marker=MARKER) as tmp:
            save_file(_unshared(tensors), tmp / WEIGHTS, metadata={"format": "pt"})
            (tmp / MARKER).write_text(record_text)
    if keep is not None and (not _distributed() or dist.get_rank() == 0):
        for old in _complete(target.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def resume_training_state(checkpoint_dir: str | Path, model: nn.Module,
                          optimizer: torch.optim.Optimizer | None = None) -> TrainingState | None:
    """Load the newest complete checkpoint of ``checkpoint_dir`` into ``model`` (and ``optimizer``)
    in place; None when there is none (a fresh start). On several ranks every rank calls it."""
    root = Path(checkpoint_dir).absolute()
    if _distributed():
        check_in("moefx.resume_training_state")
        box = [_newest(root) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)  # one choice for every rank, whatever each one lists
        directory = box[0]
    else:
        directory = _newest(root)
    if directory is None:
        return None
    record = json.loads((directory / MARKER).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{directory / MARKER} has format {record.get('format')!r}; this moefx reads format {FORMAT}")
    model = unwrap(model)
    targets = {f"model.{name}": t.detach() for name, t in named_tensors(model)}
    owners = {key: key.removeprefix("model.") for key in targets}
    fill_optimizer = _optimizer_targets(model, optimizer, record["optimizer"], tensor_specs(directory), targets, owners)
    if _distributed():
        load_distributed(model, directory, targets, owners)
    else:
        specs = tensor_specs(directory)
        missing = sorted(targets.keys() - specs.keys())
        if missing:
            raise ValueError(f"{directory} lacks the tensors {missing[:5]}: resume the model and optimizer it was saved from")
        for name, value in read_tensors({name: specs[name].file for name in targets}).items():
            targets[name].copy_(value)
    fill_optimizer()
    log.info("resumed from %s (step %d)", directory, record["step"])
    return TrainingState(step=record["step"], data_position=record["data_position"], directory=directory)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _optimizer_state(model: nn.Module, optimizer) -> tuple[dict[str, Tensor], dict[str, str], dict | None]:
    """The optimizer's tensors as ``optimizer.<param>.<key>`` (each owned by its parameter), and the
    rest (hyperparameters per group, non-tensor state) as JSON."""
    if optimizer is None:
        return {}, {}, None
    names = _param_names(model)
    tensors, owners, groups, scalars = {}, {}, [], {}
    for group in optimizer.param_groups:
        params = [_name_of(p, names) for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        for p, name in zip(group["params"], params):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{name}.{key}"] = value.detach()
                    owners[f"optimizer.{name}.{key}"] = name
                else:
                    scalars.setdefault(name, {})[key] = value
    keys = {}
    for key, name in owners.items():
        keys.setdefault(name, []).append(key.removeprefix(f"optimizer.{name}."))
    return tensors, owners, {"param_groups": groups, "tensor_state": keys, "other_state": scalars}


def _optimizer_targets(model, optimizer, record, specs, targets, owners):
    """Adds empty tensors for the saved optimizer state to ``targets`` (to be filled); returns the
    function that then hands them to the optimizer."""
    if optimizer is None:
        return lambda: None
    if record is None:
        raise ValueError("the checkpoint has no optimizer state: resume without the optimizer, or save it with one")
    names = _param_names(model)
    saved_groups = record["param_groups"]
    groups = [[_name_of(p, names) for p in g["params"]] for g in optimizer.param_groups]
    if groups != [g["params"] for g in saved_groups]:
        raise ValueError("the optimizer's parameter groups differ from the checkpoint's: build the optimizer as it "
                         "was when the checkpoint was saved (same parameters, same groups, same order)")
    params = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}
    state = {}
    for name, keys in record["tensor_state"].items():
        for key in keys:
            spec = specs[f"optimizer.{name}.{key}"]
            dtype = DTYPES[spec.dtype]
            like = params[name]
            tensor = torch.empty_like(like, dtype=dtype) if spec.shape != () else torch.empty((), dtype=dtype, device=like.device)
            targets[f"optimizer.{name}.{key}"] = tensor
            owners[f"optimizer.{name}.{key}"] = name
            state.setdefault(name, {})[key] = tensor

    def fill() -> None:
        for name, values in record["other_state"].items():
            state.setdefault(name, {}).update(values)
        optimizer.state.clear()
        for name, values in state.items():
            optimizer.state[params[name]] = values
        for group, saved in zip(optimizer.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) else value

    return fill


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _name_of(param: Tensor, names: dict[int, str]) -> str:
    if id(param) not in names:
        raise ValueError("the optimizer holds a parameter that is not the model's: pass the model it optimizes")
    return names[id(param)]


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous, and no two sharing memory (safetensors refuses that): later sharers are copied."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.device)
        out[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


def _complete(root: Path) -> list[Path]:
    """The complete checkpoints of ``root``, oldest first: ``step-N`` directories with their marker."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def _newest(root: Path) -> Path | None:
    """The newest complete checkpoint; temporaries of saves that died are removed on the way."""
    if root.is_dir():
        for stale in root.glob(".step-*.tmp-*"):
            log.warning("removing %s, a checkpoint whose writing was interrupted", stale)
            shutil.rmtree(stale, ignore_errors=True)
    complete = _complete(root)
    return complete[-1] if complete else None


def _remove_torn(target: Path) -> None:
    """A ``step-N`` directory without its marker (copied in part, say) is no checkpoint: replace it."""
    if target.is_dir() and not (target / MARKER).is_file():
        log.warning("replacing %s, a checkpoint directory without %s", target, MARKER)
        shutil.rmtree(target)
