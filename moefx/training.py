"""The router losses in the loss a model returns, for Hugging Face's Trainer and any loop that
optimises ``outputs.loss`` (what Mixtral does with ``output_router_logits``).

``add_router_losses(model)`` registers a forward hook on the root module: in training mode, an
output with a ``loss`` (a transformers ``ModelOutput`` or a dict) leaves with
``loss + moefx.aux_loss(model)`` and the router loss, detached, as ``router_loss``. Given a Trainer,
it also logs the mean router loss of the forwards since the last log beside ``loss``
(``RouterLossCallback``). transformers is imported only when a Trainer is involved.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping

import torch
from torch import nn

from moefx.model import aux_loss

ROUTER_LOSS = "router_loss"
_METER = "_moefx_router_loss_meter"  # attribute of the root module: router losses since the last log


class _Meter:
    """Sum and count of the detached router losses of the training forwards since the last ``take``."""

    def __init__(self):
        self.total = None
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def take(self, device: torch.device) -> float | None:
        """The mean since the last call (over every rank under torch.distributed), then reset."""
        total, count = self.total, self.count
        self.total, self.count = None, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.tensor([0.0 if total is None else float(total), float(count)], device=device)
            torch.distributed.all_reduce(both)
            total, count = both[0], int(both[1])
        return None if count == 0 else float(total) / count


def _router_loss_hook(module: nn.Module, args, output):
    """Forward hook of ``add_router_losses`` (module level, so deepcopy and pickle keep working)."""
    if not module.training or not isinstance(output, MutableMapping) or output.get("loss") is None:
        return None
    router = aux_loss(module)
    output["loss"] = output["loss"] + router
    output[ROUTER_LOSS] = router.detach()
    meter = module.__dict__.get(_METER)
    if meter is None:
        meter = module.__dict__[_METER] = _Meter()
    meter.add(router.detach())
    return output


def add_router_losses(target):
    """Add the router losses (``moefx.aux_loss``) to the ``loss`` the model returns in training mode.

    ``target`` is the converted model, or a transformers ``Trainer`` (its ``model`` gets the hook and
    the Trainer logs ``router_loss`` beside ``loss``). Returns ``target``. A second call adds nothing.
    Eval mode, an output without a loss (no labels) and tuple outputs are left as they are; a
    Trainer that computes its own loss (``compute_loss_func``, label smoothing) does not see them.
    """
    trainer = None
    if not isinstance(target, nn.Module):
        trainer, model = target, getattr(target, "model", None)
        if not isinstance(model, nn.Module) or not hasattr(trainer, "callback_handler"):
            raise TypeError(f"add_router_losses takes an nn.Module or a transformers Trainer, not {type(target).__name__}")
    else:
        model = target
    if not any(hook is _router_loss_hook for hook in model._forward_hooks.values()):
        model.register_forward_hook(_router_loss_hook)
    if trainer is not None:
        callbacks = trainer.callback_handler.callbacks
        if not any(isinstance(callback, _callback_class()) for callback in callbacks):
            # First, so the printer and the reporting integrations (wandb, tensorboard, ...) see it too.
            callbacks.insert(0, _callback_class()(model))
    return target


@functools.cache
def _callback_class():
    from transformers import TrainerCallback

    class RouterLossCallback(TrainerCallback):
        """Puts ``router_loss``, the mean router loss of the training forwards since the last log,
        into the Trainer's training logs and ``state.log_history``, beside ``loss``.
        ``add_router_losses(trainer)`` installs it first among the callbacks."""

        def __init__(self, model: nn.Module):
            self.model = model

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:  # evaluation and end-of-training logs
                return
            meter = self.model.__dict__.setdefault(_METER, _Meter())  # every rank takes part in the all-reduce
            param = next(self.model.parameters(), None)
            value = meter.take(torch.device("cpu") if param is None else param.device)
            if value is None:
                return
            logs[ROUTER_LOSS] = value
            # Trainer.log appended a copy of these logs to the history before calling the callbacks.
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                last[ROUTER_LOSS] = value

    RouterLossCallback.__module__ = __name__
    RouterLossCallback.__qualname__ = "RouterLossCallback"
    return RouterLossCallback


def __getattr__(name: str):
    if name == "RouterLossCallback":  # the class needs transformers: built on first use
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
