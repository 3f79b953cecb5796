"""moefx: turn the feed-forward blocks of any PyTorch model into Mixture-of-Experts layers.

Public API (README.md; the code's layout: docs/ARCHITECTURE.md): ``moefy``, ``find_ffns``, ``MoE``,
``MoEConfig``, ``FFNTemplate``, ``convert``, ``moe_layers``, ``aux_loss``, ``update_routing_bias``,
``add_router_losses``, ``save``, ``load``,
``parallelize``, ``expert_parallel_mesh``, ``save_training_state``, ``resume_training_state``, ``offload``, ``offload_stats``, ``export``.
"""

from moefx.artifact.save import save
from moefx.converting import convert
from moefx.exporting import export
from moefx.hf_save import load, moefy  # passes.driver's moefy and artifact's load, then a native save_pretrained
from moefx.init.template import FFNTemplate
from moefx.layer.config import MoEConfig
from moefx.layer.moe import MoE, MoEStats
from moefx.model import aux_loss, moe_layers, update_routing_bias
from moefx.offloading.offload import OffloadStats, offload, offload_stats
from moefx.parallel.parallelize import expert_parallel_mesh, parallelize
from moefx.parallel.resume import TrainingState, resume_training_state, save_training_state
from moefx.passes.driver import NoFFNFound, find_ffns
from moefx.passes.find_ffn import FFNMatch
from moefx.training import add_router_losses
from moefx.version import __version__

__all__ = [
    "FFNMatch", "FFNTemplate", "MoE", "MoEConfig", "MoEStats", "NoFFNFound", "aux_loss", "convert", "find_ffns", "moe_layers",
    "OffloadStats", "export", "expert_parallel_mesh", "load", "moefy", "offload", "offload_stats", "parallelize", "save",
    "add_router_losses", "update_routing_bias", "TrainingState", "resume_training_state", "save_training_state",
    "__version__",
]
