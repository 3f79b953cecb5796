"""The MoE layer: config, the layer (moe), routers, losses, experts, dispatch, activations, folded."""
