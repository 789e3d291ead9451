"""Communication compression stages, uplink and downlink (the pipeline's first users).

* :class:`~fedloom.compress.cast.Float16` / :class:`~fedloom.compress.cast.BFloat16` — casting;
* :class:`~fedloom.compress.qsgd.QSGD` — unbiased stochastic quantization to 8, 4 or 2 bits
  (Alistarh et al. 2017), seeded per (round, client);
* :class:`~fedloom.compress.topk.TopK` — top-k sparsification with error feedback (Stich et
  al. 2018; Karimireddy et al. 2019), the residual kept as client state.

Every codec acts on the trainable entries of the flat vector; buffers (BatchNorm statistics,
counters) travel exactly beside them. Each is an :class:`~fedloom.compress.base.EncodingStage`:
its client half encodes a whole batch of clients at once, its server half checks every
tensor of the payload against the exact layout the configured codec produces and decodes it.
"""

from fedloom.compress.base import EncodingStage
from fedloom.compress.cast import BFloat16, Float16
from fedloom.compress.qsgd import QSGD
from fedloom.compress.sparse import Sparse
from fedloom.compress.topk import TopK

__all__ = ["QSGD", "BFloat16", "EncodingStage", "Float16", "Sparse", "TopK"]
