"""In-process generation with a transformers model: continuous batching over one KV cache, streamed.

One module per job:

- ``engine``: ``HFBackend``, grouping requests by sampling settings and streaming each one's completions as
  soon as they are finished;
- ``scheduler``: the decode loop (``DecodeLoop``): finished rows leave the batch at once, waiting prompts take
  their places at the next step;
- ``forward``: the model's forward passes: a shared prompt prefix computed once, left-padded prefill in groups,
  one decode step;
- ``kv_cache``: cache storage in preallocated buffers, rows admitted and dropped by copying only them;
- ``attention``: the attention generation runs (grouped query heads, a shared prefix read once per step);
- ``cpu_matmul``: MKL-packed weights for CPU decode steps;
- ``sampling``: greedy or per-sequence seeded Gumbel-max sampling;
- ``transformers_internals``: every use of transformers internals, with the versions it is tested on.

The measurements behind these choices are in ``benchmarks/README.md`` (Generation throughput).
"""

from mft_bench.evaluation.backends.hf.attention import GENERATION_ATTENTION, generation_attention
from mft_bench.evaluation.backends.hf.cpu_matmul import PackedWeights
from mft_bench.evaluation.backends.hf.engine import HFBackend, plan_groups
from mft_bench.evaluation.backends.hf.forward import MIN_SHARED_PREFIX, PREFILL_ROWS, shared_prefix_length
from mft_bench.evaluation.backends.hf.sampling import Sampler, gumbel_noise, row_seed

__all__ = ["GENERATION_ATTENTION", "MIN_SHARED_PREFIX", "PREFILL_ROWS", "HFBackend", "PackedWeights", "Sampler",
           "generation_attention", "gumbel_noise", "plan_groups", "row_seed", "shared_prefix_length"]
