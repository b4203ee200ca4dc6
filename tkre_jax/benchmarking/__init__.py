"""The bench library: step timing and rows (`timing`), analytic FLOPs (`flops`), per-device peak
FLOP/s (`peaks`) and the cross-machine report (`compare`). The stage itself is
`tkre_jax.stages.bench`; committed rows and stand-alone scripts live in `benchmarks/`.
"""
