"""adopt: every existing MoE block of a model becomes a moefx ``MoE`` with the same weights and routing.

    before                                          after
      layers.0.mlp = MixtralSparseMoeBlock(           layers.0.mlp = MoE(gate="topk", num_experts=8, top_k=2)
          gate=router [E, D],                             router.weight = the block's router weight
          experts=gate_up_proj [E, 2H, D], ...)           experts.in_proj = gate_up_proj, ...

Blocks are recognised by structure and behaviour (``fused_experts``: transformers 5's stacked
experts; ``classic``: a router linear, top-k and a ModuleList of expert FFNs, read on the graph),
never by class name. Each adoption is checked numerically before the model is touched
(``verify``); a block moefx cannot express is reported with the reason and left as it is.
``find_blocks`` changes nothing; ``apply`` swaps the modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from torch import nn

from moefx.layer.moe import MoE
from moefx.passes.adopt.classic import looks_classic, match_classic
from moefx.passes.adopt.fused_experts import looks_fused, match_fused_experts
from moefx.passes.adopt.spec import AdoptedBlock, adopted_record, layer_from_record
from moefx.passes.adopt.verify import verified

log = logging.getLogger(__name__)


class AdoptionError(ValueError):
    """An option of moefy contradicts an existing MoE block."""


@dataclass(frozen=True)
class Adoption:
    """What ``find_blocks`` found: blocks to adopt (with their moefx layers) and blocks refused, with why."""

    blocks: tuple[tuple[AdoptedBlock, MoE], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    originals: tuple[nn.Module, ...] = ()  # the blocks themselves, in the order of ``blocks`` (for ``undo``)
    hooks: tuple = ()  # every module's forward hooks and transformers' "hooks installed" flag, before ``apply``


def family_aux_loss_coef(model: nn.Module) -> float | None:
    """The coefficient of a transformers model's own load-balancing loss (``router_aux_loss_coef``,
    for families whose ``output_router_logits`` adds ``load_balancing_loss_func``), else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "output_router_logits"):
        return None
    coef = getattr(config, "router_aux_loss_coef", None)
    return float(coef) if isinstance(coef, (int, float)) else None


def find_blocks(model: nn.Module) -> Adoption:
    """Every existing MoE block of ``model`` (the model is not changed)."""
    coef = family_aux_loss_coef(model)
    blocks, refused, done, originals = [], [], [], []
    for path, module in model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in done if p) or (done and done[0] == ""):
            continue
        if isinstance(module, MoE):
            done.append(path)
            continue
        result = match_fused_experts(path, module, coef)
        if result is None:
            result = match_classic(path, module)
        if result is None:
            continue
        done.append(path)
        if isinstance(result, str):
            refused.append((path or type(module).__name__, result))
            continue
        reasons = []
        for spec in result if isinstance(result, list) else [result]:
            checked = verified(module, spec)
            if isinstance(checked, str):
                reasons.append(checked)
                continue
            blocks.append(checked)
            originals.append(module)
            break
        else:
            refused.append((path or type(module).__name__, reasons[-1]))
    for path, reason in refused:
        log.warning("not adopting the MoE block %s: %s", path, reason)
    return Adoption(tuple(blocks), tuple(refused), tuple(originals))


def block_paths(model: nn.Module) -> list[str]:
    """The modules that look like MoE blocks by their parts alone (stacked experts and a router, or a
    router linear and a ModuleList of as many experts), outermost only. Needs no values: it works on
    the meta device, where ``find_blocks`` cannot tell a block's routing."""
    paths: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in paths) or isinstance(module, MoE):
            continue
        if looks_fused(module) or looks_classic(module):
            paths.append(path)
    return paths


def check_options(adoption: Adoption, *, num_experts: int | None, top_k: int | None) -> None:
    """An explicit ``num_experts`` or ``top_k`` that differs from an adopted block's is an error naming it."""
    for spec, _ in adoption.blocks:
        for name, given, own in (("num_experts", num_experts, spec.num_experts), ("top_k", top_k, spec.routing.top_k)):
            if given is not None and given != own:
                raise AdoptionError(
                    f"{name}={given} contradicts the existing MoE block {spec.path!r}, which has {name}={own}: "
                    f"an adopted block keeps its experts and routing; leave {name} out or set it to {own}"
                )


def apply(model: nn.Module, adoption: Adoption) -> None:
    """Swap each found block for its moefx layer (in the block's train/eval mode)."""
    for (spec, layer), old in zip(adoption.blocks, adoption.originals):
        if old is model:
            raise AdoptionError(f"{type(model).__name__} is itself an MoE block: pass the model that holds it")
        _swap(model, old, layer.train(old.training))
        log.info("adopted %s (%s): %d experts, top-%d", spec.path, spec.family, spec.num_experts, spec.routing.top_k)


def undo(model: nn.Module, adoption: Adoption) -> None:
    """Put the original blocks back (a later step of moefy failed: the model is left as it was), and the
    hooks as they were: a forward run during moefy may have installed transformers' output-capturing
    hooks on the moefx layers and marked the model as hooked, so that the blocks' own would never be."""
    for (_, layer), old in zip(adoption.blocks, adoption.originals):
        _swap(model, layer, old)
    for module, saved, flag in adoption.hooks:
        for name, hooks in zip(_HOOK_DICTS, saved):
            getattr(module, name).clear()
            getattr(module, name).update(hooks)
        if flag is _UNSET:
            module.__dict__.pop(_INSTALLED, None)
        else:
            module.__dict__[_INSTALLED] = flag


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_INSTALLED = "_output_capturing_hooks_installed"  # transformers installs its recorders once per model
_UNSET = object()


def _hook_state(model: nn.Module) -> tuple:
    return tuple((m, tuple(dict(getattr(m, n)) for n in _HOOK_DICTS), m.__dict__.get(_INSTALLED, _UNSET))
                 for m in model.modules())


def check_router_logits(model: nn.Module, paths: list[str]) -> None:
    """transformers' ``output_router_logits`` records each block's router output by its class (an
    ``OutputRecorder`` hook), which an adopted block no longer has: refuse before changing anything."""
    for name, module in model.named_modules():
        if getattr(getattr(module, "config", None), "output_router_logits", False) is True:
            raise AdoptionError(
                f"{type(model).__name__} has config.output_router_logits=True ({name or 'the model'}): transformers "
                f"records router logits from the routers of its MoE blocks {paths}, which moefx adopts as its own "
                "layers; set model.config.output_router_logits = False before moefy (and before moefx.load), "
                "and take the router losses from moefx.aux_loss(model) or moefx.add_router_losses"
            )


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Point every attribute that holds ``old`` to ``new``."""
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def adopt_blocks(model: nn.Module, *, num_experts: int | None, top_k: int | None) -> Adoption:
    """moefy's first step: find the existing MoE blocks, check moefy's explicit options against them
    (before any change) and swap them for moefx layers, so that capture sees moefx layers (a block
    whose forward branches on routing values, as eager expert loops do, cannot be exported)."""
    adoption = find_blocks(model)
    check_options(adoption, num_experts=num_experts, top_k=top_k)
    if adoption.blocks:
        check_router_logits(model, [spec.path for spec, _ in adoption.blocks])
    adoption = replace(adoption, hooks=_hook_state(model))
    apply(model, adoption)
    return adoption


def record_adoption(model: nn.Module, adoption: Adoption, options, example_spec: dict | None) -> None:
    """Record the adopted blocks on ``model`` (as moefy does: apart from, and before, the dense FFNs'
    conversion, so that ``moefx.load`` adopts first). ``options``: the run's ``ConversionOptions``."""
    from moefx.passes.record import Conversion, add_conversion

    if not (adoption.blocks or adoption.refused):
        return
    add_conversion(model, Conversion(
        options=options, converted=(), adopted={spec.path: adopted_record(spec, layer) for spec, layer in adoption.blocks},
        skipped=adoption.refused, example_inputs=example_spec,
    ))


def check_init(model: nn.Module, adoption: Adoption, init: str | None, *, dense_ffns: bool) -> None:
    """``init`` is for dense FFNs: explicit, with adopted blocks and no dense FFN, it is an error."""
    if adoption.blocks and init is not None and not dense_ffns:
        paths = [spec.path for spec, _ in adoption.blocks]
        raise AdoptionError(
            f"init={init!r} initialises experts from dense FFNs, and {type(model).__name__} has none: its MoE blocks "
            f"{paths} are adopted with their own expert weights; leave init out"
        )


def readopt(model: nn.Module, adopted: dict, where) -> None:
    """``moefx.load``'s replay: the moefx layers recorded by ``adopted_record`` in place of the
    blocks at their paths (on the model's device, meta included; the weights come from the file)."""
    missing = [path for path in adopted if not _has(model, path)]
    if missing:
        raise AdoptionError(
            f"{type(model).__name__} does not match the adoption recorded in {where}: no module at {missing}: "
            "pass the model the output was converted from"
        )
    if any(not isinstance(model.get_submodule(path), MoE) for path in adopted):
        check_router_logits(model, list(adopted))
    for path, record in adopted.items():
        old = model.get_submodule(path)
        if isinstance(old, MoE):
            continue
        first = next(old.parameters(), None)
        layer = layer_from_record(record, device=None if first is None else first.device,
                                  dtype=None if first is None else first.dtype)
        _swap(model, old, layer.train(old.training))


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
