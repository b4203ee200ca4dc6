"""The train step every training stage uses: loss -> gradients -> a guarded optax update.

A stage supplies only its loss (`LossFn`); `make_train_step` turns it into the pure step
`(params, opt_state, batch, rng) -> (params, opt_state, metrics)` that the trainer compiles with
explicit shardings. The update is guarded (`apply_if_finite`): when the loss or the gradient norm
is not finite the step returns the parameters and optimizer state it was given, and
`metrics["finite"] = 0`, so a non-finite value can never reach the state the trainer saves; the
trainer stops at that step and names it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
"""`loss_fn(params, batch, rng, psum) -> (loss, metrics)`: the loss already normalised over the
GLOBAL batch (float32 scalar, differentiated) and float32 scalar metrics (reported as they are).
`psum` is the identity under `jax.jit` (the batch is global) and `lax.psum` over the device axis
under `jax.pmap`; a loss uses it for its normalisers (e.g. the number of masked tokens of the global
batch), computed outside the differentiated part."""


def apply_if_finite(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                    loss: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
  """One optax update, applied only when `loss` and the gradients' global norm are finite.

  Returns:
    `(params, opt_state, grad_norm, finite)`: the updated state, or the given one unchanged when
    `finite` (a bool scalar) is False; `grad_norm` is the float32 global L2 norm of `grads`.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  return keep(new_params, params), keep(new_opt_state, opt_state), grad_norm, finite


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    axis_name: Optional[str] = None) -> Callable:
  """The pure, guarded train step of `loss_fn`.

  Args:
    loss_fn: see `LossFn`.
    tx: the optax transformation.
    axis_name: None for `jax.jit` on global (sharded) arrays. Under `jax.pmap(...,
      axis_name=...)` the loss, metrics and gradients are summed over that axis (the loss must then
      be normalised by `psum`-ed weights, so the sum is the global-batch loss) and each device draws
      its randomness from `fold_in(rng, axis_index)`.

  Returns:
    `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)`; `metrics` holds the
    loss function's metrics plus `loss`, `grad_norm` and `finite` (1.0, or 0.0 when the update
    was skipped), all float32 scalars.
  """

  def step(params, opt_state, batch, rng):
    if axis_name is None:
      psum = lambda x: x  # noqa: E731
    else:
      psum = lambda x: jax.lax.psum(x, axis_name)  # noqa: E731
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, rng, psum), has_aux=True)(params)
    loss, metrics, grads = psum(loss), psum(dict(metrics)), psum(grads)
    params, opt_state, grad_norm, finite = apply_if_finite(tx, params, opt_state, grads, loss)
    return params, opt_state, {**metrics, "loss": loss, "grad_norm": grad_norm,
                               "finite": finite.astype(jnp.float32)}

  return step
