"""Tiny dense transformers models of each family with a native MoE counterpart, and a loader that
runs in a fresh process which never imports moefx (what a user of the written checkpoint has)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DENSE = {  # dense model_type -> (config class, fields beyond SMALL that the family must carry over)
    "llama": ("LlamaConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # not hidden/heads: Qwen3-MoE must read it
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0,
                                  "attention_multiplier": 0.3}),
    "olmo2": ("Olmo2Config", {}),
}


def dense_model(model_type: str, seed: int = 0, **fields):
    name, extra = DENSE[model_type]
    config = getattr(transformers, name)(**{**SMALL, **extra, **fields})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, new_tokens: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                              pad_token_id=SMALL["pad_token_id"])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


_LOADER = """
import json, sys, torch, transformers
transformers.logging.set_verbosity_error()
jobs, results = json.loads(sys.argv[1]), {}
for key, job in jobs.items():
    model, info = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], output_loading_info=True)
    model.eval()
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        out = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=job["new"], min_new_tokens=job["new"], do_sample=False,
                                pad_token_id=job["pad"])
    torch.save({"logits": out, "tokens": tokens, "class": type(model).__name__,
                "config": model.config.to_dict(),
                "problems": {k: sorted(map(str, v)) for k, v in info.items() if v}}, job["result"])
assert not any(name == "moefx" or name.startswith("moefx.") for name in sys.modules), "moefx was imported"
"""


def load_without_moefx(jobs: dict[str, Path], ids: torch.Tensor, workdir: Path, new_tokens: int = 6) -> dict[str, dict]:
    """Each directory loaded with ``AutoModelForCausalLM.from_pretrained`` (no trust_remote_code) in
    one fresh Python process that never imports moefx: its logits on ``ids``, greedy tokens, class
    and load report (missing / unexpected keys)."""
    spec = {key: {"dir": str(d), "ids": ids.tolist(), "new": new_tokens, "pad": SMALL["pad_token_id"],
                  "result": str(workdir / f"{key}.pt")} for key, d in jobs.items()}
    run = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(spec)], capture_output=True, text=True,
                         cwd=workdir, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {key: torch.load(job["result"], weights_only=True) for key, job in spec.items()}
