"""Former home of the prepared-directory reader and the batch iterators; the names the trainer uses
are kept here. New code imports `tkre_jax.data.dataset` (the TFDS-format prepared directory) and
`tkre_jax.data.pipeline` (batches) directly."""

from __future__ import annotations

from tkre_jax.data.dataset import (META_FILE, SCALAR_KEYS, TOKEN_KEYS, PreparedWriter, load_arrays,  # noqa: F401
                                   read_meta)
from tkre_jax.data.pipeline import (MODEL_KEYS, bucket_length, iterate_batches,  # noqa: F401
                                    pretrain_batches, pretrain_num_rows,
                                    pretrain_steps_per_epoch)
