"""Optimizers and learning-rate schedules (optax).

The fine-tuning recipe of the TKRE reference: AdamW, 10% linear warm-up then linear decay to 0,
Adam eps 1e-6, global-norm gradient clipping at 1.0; no weight decay on biases, LayerNorm and the
SCL relation anchors (learned class embeddings, `heads.RelationAnchors`: decay would pull them
towards the origin for no reason the loss has). `frozen` sub-trees get no update at all (the MSLM head
warm-up freezes the encoder).
"""

from __future__ import annotations

from typing import Sequence

import jax
import optax


def warmup_linear_decay(peak_lr: float, total_steps: int, warmup_frac: float) -> optax.Schedule:
  """Linear 0 -> `peak_lr` over `warmup_frac * total_steps` steps, then linear decay to 0."""
  total_steps = max(int(total_steps), 1)
  warmup = int(round(warmup_frac * total_steps))
  decay = optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup), decay], [warmup])


NO_DECAY = ("anchors",)  # sub-tree names never decayed, whatever their rank


def _names(path) -> list:
  return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def decay_mask(params) -> object:
  """True for parameters that get weight decay: matrices (ndim >= 2), not biases, norms or the
  relation anchors (`NO_DECAY`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not set(_names(path)) & set(NO_DECAY), params)


def adamw(optim_cfg, total_steps: int, frozen: Sequence[str] = ()
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with clipping and the warm-up/decay schedule of a training section's `optim`
  sub-config (`config.optim_config`: learning_rate, warmup_frac, weight_decay, b1, b2, eps,
  grad_clip; e.g. `config.train.optim`).

  `frozen`: top-level parameter sub-trees (e.g. `("encoder",)`) whose updates are zero:
  `optax.masked(optax.set_to_zero(), ...)` zeroes their gradients before clipping (which then sees
  the other gradients only) and their updates after AdamW (whose weight decay would move them).
  The optimizer state keeps no parameter-shaped masked trees, so it checkpoints like AdamW's.
  """
  schedule = warmup_linear_decay(optim_cfg.learning_rate, total_steps, optim_cfg.warmup_frac)
  parts = []
  if frozen:
    frozen = tuple(frozen)
    mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: _names(path)[0] in frozen, params)
    parts.append(optax.masked(optax.set_to_zero(), mask))
  if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  if frozen:
    parts.append(parts[0])
  return optax.chain(*parts), schedule
