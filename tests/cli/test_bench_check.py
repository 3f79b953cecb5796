"""``moefx bench`` checks every impl's output and input gradient against the plainest impl that ran
before it times anything: a wrong impl is named and fails the run."""

from __future__ import annotations

import json

import pytest

from moefx.cli.bench import checks, command, models, runner

SMALL = ["--tokens", "96", "--d", "16", "--h", "24", "--experts", "4", "--top-k", "2", "--repeats", "1", "--warmup", "0"]


def test_agreeing_impls_pass_with_their_errors_recorded(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = command.main([*SMALL, "--impls", "moefx", "moefx_permuted", "hf_eager", "dense", "--json", str(path)])
    assert code == 0 and "MISMATCH" not in capsys.readouterr().out
    rows = {r["impl"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["moefx"]["out_err"] is None and rows["dense"]["out_err"] is None  # the reference; another function
    for impl in ("moefx_permuted", "hf_eager"):
        assert rows[impl]["checked_against"] == "moefx"
        assert 0 <= rows[impl]["out_err"] < 1e-5 and 0 <= rows[impl]["dx_err"] < 1e-5


def test_a_wrong_impl_is_named_and_fails_the_run(tmp_path, capsys, monkeypatch):
    real = models.as_token_fn

    def one_percent_off(module, impl, shape):
        fn = real(module, impl, shape)
        return (lambda x: fn(x) * 1.01) if impl == "moefx_permuted" else fn

    monkeypatch.setattr(runner, "as_token_fn", one_percent_off)
    path = tmp_path / "bench.json"
    code = command.main([*SMALL, "--impls", "moefx", "moefx_permuted", "dense", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "custom moefx_permuted: MISMATCH against moefx" in out
    row = next(r for r in json.loads(path.read_text())["results"] if r["impl"] == "moefx_permuted")
    # out and the input gradient both scale by 1.01: a relative error of 0.01 in each
    assert row["out_err"] == pytest.approx(0.01, rel=1e-3) and row["dx_err"] == pytest.approx(0.01, rel=1e-3)


def test_relative_error_of_a_nan_is_infinite():
    import torch

    want = torch.ones(3)
    assert checks.relative_error(torch.tensor([1.0, float("nan"), 1.0]), want) == float("inf")
    assert checks.relative_error(torch.tensor([1.0, 1.0, 2.0]), want) == pytest.approx(1 / 3 ** 0.5)


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "--tokens 0 must be >= 1"),
    (["--top-k", "-2"], "--top-k -2 must be >= 1"),
    (["--top-k", "9", "--experts", "4"], "--top-k 9 must be at most the number of experts (4)"),
])
def test_bad_custom_shapes_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
