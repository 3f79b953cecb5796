"""``moefx convert --router-init kmeans --calibration FILE``: the calibration inputs from a file.

A file holds token ids, or text:

- ``.safetensors``: one integer tensor (or one named ``input_ids``), ``[batch, sequence]`` or flat;
- ``.pt`` / ``.pth``: the same, read with ``torch.load(weights_only=True)``;
- ``.txt``: integers separated by white space (token ids), else text, tokenised with the tokenizer
  of the checkpoint directory being converted (a model file has no tokenizer: give token ids).

Flat ids are cut into rows as long as the example inputs' sequence (the remainder is dropped).
The ids replace the example inputs' token ids (the first positional argument, or ``input_ids=``);
an ``attention_mask=`` becomes all ones of the new shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from moefx.cli.checks import CLIError
from moefx.init.router_init import CalibrationInputs


def check_calibration_flag(args, router_init: str) -> None:
    if getattr(args, "calibration", None) and router_init != "kmeans":
        raise CLIError(f"--calibration is only read by --router-init kmeans (the router init is {router_init}): "
                       "add --router-init kmeans, or leave --calibration out", code=2)


def read_calibration(file: str | Path, model, args: tuple, kwargs: dict, tokenizer_dir: Path | None) -> CalibrationInputs:
    """The example inputs with their token ids replaced by those of ``file``."""
    file = Path(file)
    if not file.is_file():
        raise CLIError(f"--calibration {file} does not exist: give a .safetensors, .pt or .txt file of token ids", code=2)
    ids, what = _read_ids(file, tokenizer_dir)
    example, place = _token_ids(args, kwargs)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if ids.numel() == 0:
        raise CLIError(f"--calibration {file} holds no token ids", code=2)
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise CLIError(f"--calibration {file}: token ids must lie in [0, {vocab}) (the model's vocabulary), "
                       f"found {int(ids.min())}..{int(ids.max())}", code=2)
    if ids.dim() == 1:
        length = example.shape[-1] if ids.numel() >= example.shape[-1] else ids.numel()
        ids = ids[: ids.numel() // length * length].view(-1, length)
    if ids.dim() != 2:
        raise CLIError(f"--calibration {file} holds a tensor of shape {tuple(ids.shape)}: give [batch, sequence] "
                       "or flat token ids", code=2)
    ids = ids.to(dtype=example.dtype, device=example.device)
    if place is None:
        args = (ids, *args[1:])
    else:
        kwargs = {**kwargs, place: ids}
    if isinstance(kwargs.get("attention_mask"), Tensor):
        kwargs["attention_mask"] = torch.ones_like(ids, dtype=kwargs["attention_mask"].dtype)
    rows, length = ids.shape
    return CalibrationInputs(args=tuple(args), kwargs=kwargs, source=f"{file.name} ({rows}x{length} {what})")


def _token_ids(args: tuple, kwargs: dict) -> tuple[Tensor, str | None]:
    """The example's token ids and where they go (None: the first positional argument)."""
    if args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        return args[0], None
    if isinstance(kwargs.get("input_ids"), Tensor):
        return kwargs["input_ids"], "input_ids"
    raise CLIError("--calibration gives token ids, but the model's example inputs hold none (an integer tensor as "
                   "the first argument, or input_ids=): leave --calibration out to cluster on the example inputs", code=2)


def _read_ids(file: Path, tokenizer_dir: Path | None) -> tuple[Tensor, str]:
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _one_tensor(load_file(file), file), "token ids"
        except SafetensorError as err:
            raise CLIError(f"--calibration {file} cannot be read as safetensors ({err})", code=2) from err
    if suffix in (".pt", ".pth"):
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses pickled objects: say so in one line
            raise CLIError(f"--calibration {file} cannot be read with torch.load(weights_only=True) ({err})", code=2) from err
        return _one_tensor(loaded if isinstance(loaded, dict) else {"ids": loaded}, file), "token ids"
    if suffix == ".txt":
        text = file.read_text()
        words = text.split()
        if words and all(w.lstrip("-").isdigit() for w in words):
            return torch.tensor([int(w) for w in words]), "token ids"
        return _tokenise(text, file, tokenizer_dir), "tokens of text"
    raise CLIError(f"--calibration {file}: unknown kind of file {suffix!r}; give .safetensors, .pt or .txt", code=2)


def _one_tensor(tensors: dict, file: Path) -> Tensor:
    chosen = tensors.get("input_ids") if "input_ids" in tensors else None
    if chosen is None and len(tensors) == 1:
        chosen = next(iter(tensors.values()))
    if not isinstance(chosen, Tensor) or chosen.is_floating_point() or chosen.is_complex():
        raise CLIError(f"--calibration {file} must hold one integer tensor of token ids (or one named input_ids), "
                       f"found {sorted(tensors)}", code=2)
    return chosen.long()


def _tokenise(text: str, file: Path, tokenizer_dir: Path | None) -> Tensor:
    if tokenizer_dir is None:
        raise CLIError(f"--calibration {file} holds text, and a model file has no tokenizer to turn it into token ids: "
                       "give token ids (integers separated by spaces, .safetensors or .pt)", code=2)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise CLIError(f"--calibration {file} holds text, but {tokenizer_dir} has no tokenizer to read it ({err}): "
                       "give token ids instead", code=2) from err
    return torch.tensor(tokenizer(text)["input_ids"])
