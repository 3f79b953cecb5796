"""The command's error type and the checks of its options that argparse cannot express."""

from __future__ import annotations

import argparse
from pathlib import Path


class CLIError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def check_conversion_options(args: argparse.Namespace) -> None:
    """The limits argparse's types cannot express, as usage errors; fills the gate's default top-k."""
    if args.top_k is None:  # Switch routes each token to one expert; every other gate defaults to 2
        args.top_k = 1 if args.gate == "switch" else 2
    if args.experts < 2:
        raise CLIError(f"--experts {args.experts} is too small: an MoE layer needs at least 2 experts", code=2)
    if not 1 <= args.top_k <= args.experts:
        raise CLIError(f"--top-k {args.top_k} must be between 1 and --experts ({args.experts})", code=2)
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        raise CLIError(f"--capacity-factor {args.capacity_factor} must be > 0 (leave it out for dropless routing)", code=2)
    if args.every < 1:
        raise CLIError(f"--every {args.every} must be >= 1 (1 converts every FFN)", code=2)


def check_model_file(path: str) -> Path:
    """``path`` as a model file, or a usage error that says which sources are accepted."""
    from moefx.artifact.model_file import source_problem

    problem = source_problem(path)
    if problem is not None:
        raise CLIError(problem, code=2)
    return Path(path)


def options_from_args(args: argparse.Namespace) -> dict:
    """moefy's options from the command's, checked before any work (a bad combination, such as
    ``--gate switch`` with ``--top-k 2``, is a usage error)."""
    from moefx.passes.driver import conversion_options

    try:
        return conversion_options(
            num_experts=args.experts, top_k=args.top_k, init=args.init, gate=args.gate,
            capacity_factor=args.capacity_factor, include=args.include, exclude=args.exclude, every=args.every,
            **_sigmoid_options(args),
        )
    except ValueError as err:
        raise CLIError(str(err), code=2) from err


def _sigmoid_options(args: argparse.Namespace) -> dict:
    """The sigmoid gate's options that differ from their defaults (moefy records only those)."""
    given = {"expert_groups": (args.expert_groups, 1), "topk_groups": (args.topk_groups, None),
             "bias_update_rate": (args.bias_update_rate, 0.0)}
    return {name: value for name, (value, default) in given.items() if value != default}
