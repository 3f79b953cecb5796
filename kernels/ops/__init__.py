"""One ``torch.library`` custom op per file (schema, fake, autograd, default implementation).

``OPS`` is the table of moefx's forward ops, defined here once: each entry is the name of its
module in this folder and of ``torch.ops.moefx.<name>``. ``moefx.kernels`` imports the modules it
lists (which registers the ops, with their backward ops) and exports it as ``FORWARD_OPS``.
dtypes.py and segments.py are helpers the ops share, not ops.
"""

# The ops a forward can contain; their backward ops (``<name>_backward``) are not listed.
OPS = (
    "route", "permute", "plan_dispatch", "grouped_linear", "gather_grouped_linear", "grouped_linear_combine",
    "unpermute", "all_to_all", "swiglu",
)
