"""moefx: turn the feed-forward blocks of any PyTorch model into Mixture-of-Experts layers.

Public API (see DESIGN.md): ``MoE``, ``MoEConfig``, ``FFNTemplate``, ``moe_layers``, ``aux_loss``.
"""

from moefx.config import MoEConfig
from moefx.layer import MoE, MoEStats
from moefx.model import aux_loss, moe_layers
from moefx.template import FFNTemplate

__version__ = "0.1.0"

__all__ = ["FFNTemplate", "MoE", "MoEConfig", "MoEStats", "aux_loss", "moe_layers", "__version__"]
