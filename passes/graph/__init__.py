"""Graph helpers the passes share: op tables, the linear normal form, dominance, the feature axis,
how ops act on rows, and an activation's subgraph."""
