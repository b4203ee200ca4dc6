"""Optimizers and learning-rate schedules (optax).

The fine-tuning recipe of the TKRE reference: AdamW, 10% linear warm-up then linear decay to 0,
Adam eps 1e-6, global-norm gradient clipping at 1.0; no weight decay on biases and LayerNorm.
"""

from __future__ import annotations

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


def decay_mask(params) -> object:
  """True for parameters that get weight decay: matrices (ndim >= 2), not biases or norms."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(train_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with clipping and the warm-up/decay schedule from a `config.train`-like section.

  Fields read: learning_rate, warmup_frac, weight_decay, adam_b1, adam_b2, adam_eps, grad_clip.
  """
  schedule = warmup_linear_decay(train_cfg.learning_rate, total_steps, train_cfg.warmup_frac)
  parts = []
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                           eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
