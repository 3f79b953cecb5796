"""inline: an FFN written inside a bigger forward is rewritten in that module's own forward.

    before: blocks.0 (Block)                     after: blocks.0 (still a Block, same attributes)
      forward: x + down(gelu(up(x)))               forward (torch.fx code): x + up_moe(x)
      up, down: Linear                             up_moe: MoE      (up and down are its experts now)

One job per module, in the order ``rewrite`` runs them:

- ``record_calls``: the arguments each module got when the model ran on the example inputs;
- ``trace``: the module's forward traced by torch.fx alone, the arguments that were constant fixed;
- ``check``: the trace must give the forward's outputs on those calls (on a random CPU copy for a
  module on the meta device), all of it before any change;
- ``parents``: the above for every module holding an inline FFN, and which FFNs cannot be rewritten;
- ``surgery``: the FFN's nodes replaced by a call of its MoE;
- ``subclass``: the rewritten graph becomes the forward of a subclass of the module's class, made
  for that one object (its other weights, attributes, methods and ``isinstance`` stay), which
  pickles as the user's class, the graph and the state.
"""

from moefx.passes.inline.errors import InlineError
from moefx.passes.inline.parents import trace_parents
from moefx.passes.inline.subclass import new_inline as _new_inline  # noqa: F401  (named by pickles made before the split)
from moefx.passes.inline.surgery import regions_of, rewrite_inline
from moefx.passes.inline.trace import Traced

__all__ = ["InlineError", "Traced", "regions_of", "rewrite_inline", "trace_parents"]
