"""The command's error type and the checks of its options that argparse cannot express."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moefx.passes.options import ConversionOptions


class CLIError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def check_model_file(path: str) -> Path:
    """``path`` as a model file, or a usage error that says which sources are accepted."""
    from moefx.artifact.model_file import source_problem

    problem = source_problem(path)
    if problem is not None:
        raise CLIError(problem, code=2)
    return Path(path)


def options_from_args(args: argparse.Namespace) -> ConversionOptions:
    """moefy's options from the command's, checked before any work: a bad value, or a bad
    combination such as ``--gate switch`` with ``--top-k 2``, is a usage error that names the flag
    where the command has its own words. Fills the gate's default top-k into ``args``."""
    from moefx.passes.options import ConversionOptions, InvalidOption

    if args.top_k is None:  # Switch routes each token to one expert; every other gate defaults to 2
        args.top_k = 1 if args.gate == "switch" else 2
    try:
        return ConversionOptions(
            num_experts=args.experts, top_k=args.top_k, init=args.init, gate=args.gate,
            capacity_factor=args.capacity_factor, include=args.include, exclude=args.exclude, every=args.every,
            router_init=args.router_init, seed=getattr(args, "seed", 0),
            moe_options=_sigmoid_options(args),
        )
    except InvalidOption as err:
        words = _OUT_OF_RANGE.get(err.field) if err.bounds is not None else None
        raise CLIError(words(err.value, *err.bounds) if words else str(err), code=2) from err
    except ValueError as err:
        raise CLIError(str(err), code=2) from err


# The command's words for a value out of its range, by field; the limits are the options' own (the
# error's bounds). Other bad values are reported in the options' words.
_OUT_OF_RANGE = {
    "num_experts": lambda value, low, high: (
        f"--experts {value} is too small: an MoE layer needs at least {low} experts"),
    "top_k": lambda value, low, high: f"--top-k {value} must be between {low} and --experts ({high})",
    "capacity_factor": lambda value, low, high: (
        f"--capacity-factor {value} must be > {low} (leave it out for dropless routing)"),
    "every": lambda value, low, high: f"--every {value} must be >= {low} (1 converts every FFN)",
}


def _sigmoid_options(args: argparse.Namespace) -> dict:
    """The sigmoid gate's options that differ from their defaults (moefy records only those)."""
    given = {"expert_groups": (args.expert_groups, 1), "topk_groups": (args.topk_groups, None),
             "bias_update_rate": (args.bias_update_rate, 0.0)}
    return {name: value for name, (value, default) in given.items() if value != default}
