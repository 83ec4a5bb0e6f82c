"""fastreg's benchmark suite: ``python -m fastreg.bench --help`` (see benchmarks/README.md).

Modules: ``common`` (timing, memory, provenance, CSV, tables), ``lce`` (fused linear
cross-entropy vs torch eager / torch.compile / torch native / Liger / CCE / the 3-matmul floor),
``optim`` (fastreg.optim vs torch.optim for-loop / foreach / fused), ``workloads`` (loss
workloads like real training: SFT prompt masks, bf16/fp16, a peaked trained-LM-like input),
``bars`` (the pass/fail targets of the performance issues), ``plots``.
"""
