"""Model cutting: make the model fit a device and cut its traffic (layer 4, no gRPC).

* :mod:`~fedloom.cutting.magnitude` — magnitude pruning of the global model during training
  with Zhu & Gupta's (2017) sparsity schedule, global or per layer; the mask travels to the
  clients, whose local training keeps pruned weights at exactly zero.
* :mod:`~fedloom.cutting.structured` — structured pruning (whole neurons / channels) at
  export: a smaller dense model whose outputs equal the masked model's.
* :mod:`~fedloom.cutting.quantize` — int8 post-training quantization and fp16 of the exported
  model.
"""
