"""Meshes, logical-axis sharding rules and multi-host input helpers, on 8 fake CPU devices."""

import flax
from flax import nnx
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from tkre_jax.parallel import mesh as mesh_lib
from tkre_jax.parallel import sharding as sh
from tkre_jax.parallel.mesh import MeshError, make_mesh

flax.config.update("flax_always_shard_variable", False)

VOCAB, EMBED, MLP = 1002, 64, 128  # 1002 % 8 != 0: the vocab dim cannot be split 8 ways

pytestmark = pytest.mark.multidevice


@pytest.fixture(autouse=True)
def _eight_devices():
  if jax.device_count() != 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (see conftest.py)")


# --- meshes ---------------------------------------------------------------------------------------


def _shape(mesh):
  return {a: mesh.shape[a] for a in mesh.axis_names}


@pytest.mark.parametrize("spec, expected", [
    ("cpu", {"data": 8, "fsdp": 1, "tensor": 1}),
    ("data:2,fsdp:2,tensor:2", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("data:-1,tensor:2", {"data": 4, "fsdp": 1, "tensor": 2}),
    ("fsdp:8", {"data": 1, "fsdp": 8, "tensor": 1}),
    ("tensor:2, fsdp:-1", {"data": 1, "fsdp": 4, "tensor": 2}),
])
def test_make_mesh_shapes(spec, expected):
  mesh = make_mesh(spec)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert _shape(mesh) == expected
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices():
  mesh = make_mesh("cpu", devices=jax.devices()[:4])
  assert _shape(mesh) == {"data": 4, "fsdp": 1, "tensor": 1}
  mesh = make_mesh("data:2,fsdp:2", devices=jax.devices()[4:])
  assert {d.id for d in mesh.devices.flat} == {4, 5, 6, 7}


@pytest.mark.parametrize("name, n, expected", [
    ("cpu", 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ("gpu", 2, {"data": 2, "fsdp": 1, "tensor": 1}),
    ("gpu-8", 8, {"data": 1, "fsdp": 8, "tensor": 1}),
    ("tpu-v4-8", 4, {"data": 1, "fsdp": 4, "tensor": 1}),
    ("tpu-v4-32", 16, {"data": 1, "fsdp": 16, "tensor": 1}),
    ("tpu-v5e-8", 8, {"data": 1, "fsdp": 8, "tensor": 1}),
    ("tpu-v5p-8", 4, {"data": 1, "fsdp": 4, "tensor": 1}),
    ("tpu-v6e-8", 8, {"data": 1, "fsdp": 8, "tensor": 1}),
])
def test_preset_shape_resolution(name, n, expected):
  preset = mesh_lib.get_preset(name)
  assert preset.num_devices in (None, n)
  assert preset.resolved_shape(n) == expected
  assert name in mesh_lib.describe_presets()


def test_presets_table():
  expected = {  # name -> platform, devices, hosts
      "cpu": ("cpu", None, 1), "gpu": ("gpu", None, None), "gpu-8": ("gpu", 8, 1),
      "tpu-v4-8": ("tpu", 4, 1), "tpu-v4-32": ("tpu", 16, 4), "tpu-v5e-8": ("tpu", 8, 1),
      "tpu-v5p-8": ("tpu", 4, 1), "tpu-v6e-8": ("tpu", 8, 1),
  }
  assert {n: (p.platform, p.num_devices, p.num_hosts)
          for n, p in mesh_lib.PRESETS.items()} == expected


def test_tpu_preset_on_cpu_is_a_clear_error():
  with pytest.raises(MeshError) as e:
    make_mesh("tpu-v4-8")
  msg = str(e.value)
  assert "tpu-v4-8" in msg and "4 TPU devices" in msg and "TPU v4" in msg
  assert "found 8 devices of platform cpu" in msg and "cpu:0" in msg
  assert isinstance(e.value, ValueError)


def test_pod_preset_on_one_process_says_so():
  with pytest.raises(MeshError, match=r"(?s)multi-host.*4 hosts.*single process|single process"
                     r".*multi-host"):
    make_mesh("tpu-v4-32")


@pytest.mark.parametrize("spec", ["gpu", "gpu-8", "tpu-v6e-8"])
def test_other_platform_presets_fail(spec):
  with pytest.raises(MeshError, match="platform cpu"):
    make_mesh(spec)


@pytest.mark.parametrize("spec, match", [
    ("model:2", "unknown axis 'model'"),
    ("data:-1,fsdp:-1", "at most one axis may be -1"),
    ("data:3", "expects 3 devices.*found 8 devices"),
    ("data:2,tensor:2", "expects 4 devices.*found 8 devices"),
    ("data:-1,tensor:3", "cannot fill data=-1"),
    ("data:two", "not an integer"),
    ("data:0", "must be >= 1 or -1"),
    ("data:2,data:4", "given twice"),
    ("", "empty mesh spec"),
    ("tpu-v9", "not a preset"),
])
def test_bad_specs(spec, match):
  with pytest.raises(MeshError, match=match):
    make_mesh(spec)


def test_explicit_spec_count_checked_against_given_devices():
  with pytest.raises(MeshError, match="expects 8 devices.*found 4 devices"):
    make_mesh("data:2,fsdp:2,tensor:2", devices=jax.devices()[:4])


def test_distributed_detection(monkeypatch):
  reason = mesh_lib.multi_process_reason
  assert reason({}) is None
  assert reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert "2 hosts" in reason({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"})
  assert reason({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert reason({"SLURM_NTASKS": "4"}) and reason({"SLURM_NTASKS": "1"}) is None
  assert reason({"OMPI_COMM_WORLD_SIZE": "2"})
  assert reason({"TKRE_DISTRIBUTED": "1"}) and reason({"TKRE_DISTRIBUTED": "0", "SLURM_NTASKS": "4"
                                                      }) is None
  for var in ("TKRE_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
              "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.maybe_initialize_distributed() is False
  assert mesh_lib.is_primary()


# --- logical -> mesh rules -------------------------------------------------------------------------

SIZES = {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("rules, logical, shape, sizes, expected", [
    ("fsdp", ("embed", "mlp"), (64, 128), SIZES, P("fsdp", None)),       # fsdp used once
    ("fsdp", ("mlp", "embed"), (128, 64), SIZES, P("fsdp", None)),
    ("fsdp", ("vocab", "embed"), (1000, 64), SIZES, P("fsdp", None)),
    ("fsdp", ("vocab", "embed"), (VOCAB, 64), SIZES, P(None, "fsdp")),   # 1002 % 8: fallback
    ("fsdp", ("norm",), (64,), SIZES, P(None)),
    ("fsdp", (None, "embed"), (512, 64), SIZES, P(None, "fsdp")),
    ("fsdp", ("unknown_name", "embed"), (8, 64), SIZES, P(None, "fsdp")),
    ("fsdp", ("embed",), (60,), SIZES, P(None)),                          # 60 % 8: replicated
    ("dp", ("vocab", "embed"), (1000, 64), SIZES, P(None, None)),
    ("dp", ("batch", "length"), (16, 32), {"data": 2, "fsdp": 4, "tensor": 1},
     P(("data", "fsdp"), None)),
    ("fsdp_tp", ("embed", "mlp"), (64, 128), {"data": 1, "fsdp": 4, "tensor": 2},
     P("fsdp", "tensor")),
    ("fsdp_tp", ("mlp", "embed"), (128, 64), {"data": 1, "fsdp": 4, "tensor": 2},
     P("tensor", "fsdp")),
    ("fsdp_tp", ("vocab", "embed"), (30522, 768), {"data": 1, "fsdp": 2, "tensor": 4},
     P("fsdp", "tensor")),              # 30522 % 4 != 0: vocab falls back to fsdp, embed to tensor
    ("fsdp_tp", ("vocab", "embed"), (30522, 768), {"data": 1, "fsdp": 4, "tensor": 4},
     P(None, "fsdp")),                                  # neither divides 30522: embed takes fsdp
    ("fsdp_tp", ("vocab", "embed"), (30522, 768), {"data": 1, "fsdp": 4, "tensor": 2},
     P("tensor", "fsdp")),
    ("fsdp_tp", ("embed", "heads"), (768, 12), {"data": 1, "fsdp": 2, "tensor": 8},
     P("fsdp", None)),                                                    # 12 heads % 8
    # batch over (data, fsdp) when fsdp is already taken keeps only data
    ([("embed", "fsdp"), ("batch", ("data", "fsdp"))], ("embed", "batch"), (64, 16),
     {"data": 2, "fsdp": 4, "tensor": 1}, P("fsdp", "data")),
    # mapping form; a tuple entry splits one dim over two logical names
    ({"a": "data", "b": "tensor"}, (("a", "b"), None), (16, 3), {"data": 2, "fsdp": 1, "tensor": 4},
     P(("data", "tensor"), None)),
    # fallback candidates in pair form
    ([("x", "tensor"), ("x", "fsdp")], ("x",), (6,), {"data": 1, "fsdp": 2, "tensor": 4}, P("fsdp")),
])
def test_logical_to_mesh_spec(rules, logical, shape, sizes, expected):
  assert sh.logical_to_mesh_spec(logical, rules, mesh=sizes, shape=shape) == expected


def test_logical_to_mesh_spec_without_shape_skips_divisibility():
  assert sh.logical_to_mesh_spec(P("vocab", "embed"), "fsdp") == P("fsdp", None)
  assert sh.logical_to_mesh_spec(None, "fsdp") == P()


def test_rules_errors():
  with pytest.raises(sh.ShardingRulesError, match="unknown sharding rules"):
    sh.get_rules("zero3")
  with pytest.raises(sh.ShardingRulesError, match="pair"):
    sh.get_rules([("embed",)])
  with pytest.raises(sh.ShardingRulesError, match="does not have"):
    sh.logical_to_mesh_spec(("embed",), {"embed": "model"}, mesh=SIZES, shape=(8,))
  with pytest.raises(sh.ShardingRulesError, match="2 dimensions"):
    sh.logical_to_mesh_spec(("embed", "mlp"), "fsdp", mesh=SIZES, shape=(8,))
  assert sh.get_rules({"embed": ["fsdp", "tensor"], "norm": None}) == (
      ("embed", ("fsdp", "tensor")), ("norm", None))


# --- sharded parameter creation --------------------------------------------------------------------


class TinyModel(nnx.Module):
  """Embedding-dominated: 1002 x 64 table, a 64 -> 128 -> 64 MLP and a LayerNorm."""

  def __init__(self, rngs: nnx.Rngs):
    part = nnx.with_partitioning
    self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs, embedding_init=part(
        nnx.initializers.normal(0.02), ("vocab", "embed")))
    self.up = nnx.Linear(EMBED, MLP, rngs=rngs,
                         kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=part(nnx.initializers.zeros_init(), ("mlp",)))
    self.down = nnx.Linear(MLP, EMBED, rngs=rngs,
                           kernel_init=part(nnx.initializers.lecun_normal(), ("mlp", "embed")),
                           bias_init=part(nnx.initializers.zeros_init(), ("embed",)))
    self.norm = nnx.LayerNorm(EMBED, rngs=rngs,
                              scale_init=part(nnx.initializers.ones_init(), ("norm",)),
                              bias_init=part(nnx.initializers.zeros_init(), ("norm",)))

  def __call__(self, ids):
    x = self.embed(ids)
    return self.norm(x + self.down(jax.nn.gelu(self.up(x))))


TX = optax.adamw(1e-3)


def _create():
  params = nnx.state(TinyModel(nnx.Rngs(0)), nnx.Param)
  return params, TX.init(params)


def _spec(x):
  return x.get_value().sharding.spec if isinstance(x, nnx.Variable) else x.sharding.spec


def test_params_and_optimizer_state_created_sharded():
  mesh = make_mesh("fsdp:8")
  abstract = jax.eval_shape(_create)
  shardings = sh.state_shardings(abstract, mesh, "fsdp")
  params, opt_state = jax.jit(_create, out_shardings=shardings)()

  expected = {
      ("embed", "embedding"): P(None, "fsdp"),  # vocab 1002 not divisible by 8
      ("up", "kernel"): P("fsdp", None), ("up", "bias"): P("fsdp"),
      ("down", "kernel"): P("fsdp", None), ("down", "bias"): P("fsdp"),
      ("norm", "scale"): P(None), ("norm", "bias"): P(None),
  }
  for path, spec in expected.items():
    a, b = path
    assert _spec(params[a][b]) == spec, path
    assert _spec(opt_state[0].mu[a][b]) == spec, path   # moments mirror their param
    assert _spec(opt_state[0].nu[a][b]) == spec, path
  assert opt_state[0].count.sharding.is_fully_replicated
  emb = params["embed"]["embedding"].get_value()
  assert {s.data.shape for s in emb.addressable_shards} == {(VOCAB, EMBED // 8)}

  frac = sh.replicated_fraction(params, sh.state_shardings(jax.eval_shape(lambda: params), mesh,
                                                           "fsdp"))
  assert frac <= 0.05
  assert sh.replicated_fraction(params) == pytest.approx(frac)  # from the arrays' own shardings
  assert sh.replicated_fraction(abstract[0], sh.state_shardings(abstract[0], mesh, "dp")) == 1.0
  assert 0.01 < float(np.std(np.asarray(emb))) < 0.03  # normal(0.02) init, not zeros


def test_nnx_optimizer_state_and_fsdp_tp():
  mesh = make_mesh("data:2,fsdp:2,tensor:2")

  def create():
    model = TinyModel(nnx.Rngs(0))
    return nnx.state(nnx.Optimizer(model, TX, wrt=nnx.Param))

  shardings = sh.state_shardings(jax.eval_shape(create), mesh, "fsdp_tp")
  state = jax.jit(create, out_shardings=shardings)()
  mu = state["opt_state"][0]["mu"]
  assert _spec(mu["up"]["kernel"]) == P("fsdp", "tensor")
  assert _spec(mu["down"]["kernel"]) == P("tensor", "fsdp")
  assert _spec(mu["embed"]["embedding"]) == P("tensor", "fsdp")
  assert _spec(state["step"]) == P()


def test_mirror_for_pure_dict_optimizer_state():
  mesh = make_mesh("fsdp:8")

  def create():
    params = nnx.to_pure_dict(nnx.state(TinyModel(nnx.Rngs(0)), nnx.Param))
    return params, TX.init(params)

  abstract_params = nnx.eval_shape(lambda: nnx.state(TinyModel(nnx.Rngs(0)), nnx.Param))
  shardings = sh.state_shardings(jax.eval_shape(create), mesh, "fsdp", mirror=abstract_params)
  params, opt_state = jax.jit(create, out_shardings=shardings)()
  assert params["up"]["kernel"].sharding.spec == P("fsdp", None)
  assert opt_state[0].mu["embed"]["embedding"].sharding.spec == P(None, "fsdp")
  assert opt_state[0].count.sharding.spec == P()


def test_sharded_contracting_dim_matmul():
  mesh = make_mesh("data:2,tensor:4")
  x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
  w = np.arange(16 * 12, dtype=np.float32).reshape(16, 12) / 100
  xs = jax.device_put(x, NamedSharding(mesh, P("data", "tensor")))
  ws = jax.device_put(w, NamedSharding(mesh, P("tensor", None)))

  @jax.jit
  def f(x, w):
    y = x @ w  # contracting dim sharded over tensor: an all-reduce, no ShardingTypeError
    return sh.with_logical_constraint(y, ("batch", "mlp"), mesh, "fsdp_tp")

  y = f(xs, ws)
  np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5)
  # the size-1 fsdp axis may be dropped from the spec: compare the device layout
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor")), 2)


def test_host_local_to_global():
  mesh = make_mesh("data:2,fsdp:2,tensor:2")
  assert sh.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sh.replicated(mesh).is_fully_replicated
  local = {"input_ids": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
           "label": np.arange(16, dtype=np.int32)}
  batch = sh.host_local_to_global(local, mesh)
  for key, value in local.items():
    arr = batch[key]
    assert arr.shape == value.shape and arr.sharding == sh.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arr), value)
    assert {s.data.shape[0] for s in arr.addressable_shards} == {4}
  with pytest.raises(ValueError, match="not divisible by its 4 batch shards"):
    sh.host_local_to_global({"label": np.zeros(6, np.int32)}, mesh)
  with pytest.raises(ValueError, match="scalar"):
    sh.host_local_to_global({"step": np.int32(3)}, mesh)
