"""Per-task models and losses: what each training stage optimises (the K-shot classifier, MSLM and
SCL, prototypical episodes), with the TKRE losses and span masking. The engine that runs them is
`tkre_jax.train`.
"""
