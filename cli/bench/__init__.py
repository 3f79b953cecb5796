"""Forward+backward time of one MoE layer: moefx against transformers' Mixtral block and a dense limit.

For each shape, on the same input and the same expert and router weights, it times one training
step (forward, then ``out.backward(grad)`` with a fixed random ``grad``) of:

  moefx          ``moefx.MoE`` (top-k gate over a softmax, renormalised, dropless): the fused
                 ops, gather in the first grouped linear and combine in the second
  moefx_permuted the same layer on its permuted path (permute, grouped linear, unpermute),
                 which expert parallelism runs
  moefx_ref      on CUDA, the same layer with the Triton kernels switched off: the ops' default
                 PyTorch implementations, one GEMM per expert (on CPU that is moefx itself)
  hf_eager       transformers' ``MixtralSparseMoeBlock`` with ``experts_implementation="eager"``
  hf_grouped_mm  the same block with ``experts_implementation="grouped_mm"``
  dense          a SwiGLU FFN of hidden size top_k * d_hidden: the same active FLOPs with no
                 routing, the limit an MoE layer can reach

Before timing, every implementation's output and input gradient are compared with those of the
plainest one that ran (``moefx_ref``, else ``moefx``, else ``hf_eager``): the relative error
``‖a − b‖ / ‖b‖`` is in the table, and one over the dtype's tolerance is reported as a MISMATCH
(exit status 1), so a fast but wrong kernel cannot pass unseen. Steps are interleaved
round-robin over the implementations so that drift on a shared machine hits all of them alike.
It reports the median step time, ``dense/impl`` (1.0 = as fast as the dense limit, higher is
better), moefx's speedup over each transformers implementation and, on CUDA, each step's peak
memory above what was allocated before it.

Run it as ``moefx bench`` (or ``python benchmarks/bench_layer.py``, the same code):

    moefx bench                                           # S1 and S2
    moefx bench --shapes S2 --repeats 15 --json /tmp/bench.json
    moefx bench --tokens 8192 --experts 16 --top-k 4      # a custom shape
    moefx bench --shapes S2 --processes 5                 # 5 fresh processes, and their median

Record the results in benchmarks/RESULTS.md.

The package, one job per module:

  cases      the shapes, the implementations' names and the Result of one (shape, impl)
  models     the compared implementations, built with the same weights, as token functions
  timing     one training step, and its time (and peak memory on CUDA)
  checks     each impl's output and input gradient against a reference; MISMATCH lines
  runner     one shape: build, warm up, check, then time round-robin
  report     the table, the target lines and the JSON file
  command    the arguments and ``main``
  processes  ``--processes N``: the benchmark in N fresh processes and their medians
"""

from moefx.cli.bench.command import main

__all__ = ["main"]
