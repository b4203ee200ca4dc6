"""Model code: the BERT / RoBERTa encoder, the task heads and the HF checkpoint importer.

Importing this package turns flax's eager variable sharding off, so that creating a model
needs no device mesh: parameters only carry their logical axis names as `out_sharding`
metadata, and `tkre_jax/parallel/mesh.py` turns those names into shardings later.
"""

import flax

flax.config.update("flax_always_shard_variable", False)
