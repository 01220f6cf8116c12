"""Sharding on 8 fake CPU devices: parameters created or loaded already split over a
(data=2, fsdp=2, tensor=2) mesh, and the sharded forward pass and sampler match one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omniopd_jax import sharding
from omniopd_jax.models import hf
from omniopd_jax.models import lm as model_lib
from omniopd_jax.rollout import sampler

CFG = model_lib.ModelConfig(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  architecture="qwen2",
  qkv_bias=True,
)
SMALL = 256  # parameters with fewer elements (norm scales, biases) may stay replicated


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
  return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


@pytest.fixture(scope="module")
def single():
  return model_lib.CausalLM(CFG, rngs=nnx.Rngs(0))


def _assert_split(model, mesh):
  """Every parameter of >= SMALL elements lives in pieces: no device holds all of it."""
  checked = 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = v[...]
    assert x.sharding.mesh.shape == mesh.shape, path
    if x.size < SMALL:
      continue
    shards = x.addressable_shards
    assert len(shards) == 8 and all(s.data.size < x.size for s in shards), (path, x.sharding)
    checked += 1
  assert checked >= 2 + (1 if model.config.scan_layers else CFG.num_hidden_layers) * 7


def test_create_sharded_splits_every_large_parameter(mesh, single):
  model = sharding.create_sharded(lambda: model_lib.CausalLM(CFG, rngs=nnx.Rngs(0)), mesh)
  _assert_split(model, mesh)
  embed = model.embed_tokens[...]
  assert embed.sharding.spec == P("tensor", "fsdp")  # vocab -> tensor, embed -> fsdp
  # The same initialiser and seed give the same values as the unsharded model.
  np.testing.assert_allclose(np.asarray(embed), np.asarray(single.embed_tokens[...]), rtol=1e-6)


def test_loaded_parameters_arrive_sharded(mesh, single, tmp_path):
  hf.save_pretrained(single, None, str(tmp_path))
  model, _ = hf.load_pretrained(str(tmp_path), mesh=mesh)
  _assert_split(model, mesh)
  for (path, a), (_, b) in zip(
    nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(single, nnx.Param))
  ):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_sharded_forward_matches_one_device(mesh, single):
  sharded = sharding.shard_module(nnx.merge(*nnx.split(single)), mesh)
  _assert_split(sharded, mesh)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
  mask = np.ones((8, 12), bool)
  mask[::2, :5] = False  # left padding on half the rows
  graphdef, state = nnx.split(sharded)
  forward = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))
  got = forward(state, sharding.global_batch(ids, mesh), sharding.global_batch(mask, mesh))
  want = single(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sharded_sampler_matches_one_device(mesh, single):
  sharded = sharding.shard_module(nnx.merge(*nnx.split(single)), mesh)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (4, 9, 2)]  # 3 rows -> 4
  kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, seed=3, eos_ids=[2])
  got = sampler.generate(sharded, prompts, mesh=mesh, **kw)
  want = sampler.generate(single, prompts, **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  np.testing.assert_allclose(got.entropy, want.entropy, atol=1e-5)
  _assert_split(sharded, mesh)  # the sampler did not gather the parameters in place


def test_generate_fn_keeps_rows_sharded(mesh, single):
  sharded = sharding.shard_module(nnx.merge(*nnx.split(single)), mesh)
  graphdef, state = nnx.split(sharded)
  fn = sampler.make_generate_fn(
    graphdef, sampler.SamplingOptions(4, temperature=0.0), mesh=mesh, state=state
  )
  tokens, mask = sampler.pad_prompts([[5, 6, 7]] * 8)
  out = fn(state, sharding.global_batch(tokens, mesh), sharding.global_batch(mask, mesh), 0)
  assert out["tokens"].sharding.spec[0] == ("data", "fsdp")
  assert out["tokens"].shape == (8, 4)


def test_scanned_model_loads_sharded_and_samples_like_one_device(mesh, single, tmp_path):
  """scan_layers: stacked [L, ...] parameters load split over the mesh (the layer axis whole), and
  the sharded sampler's stacked KV cache gives the unrolled single-device rows."""
  hf.save_pretrained(single, None, str(tmp_path))
  scanned, _ = hf.load_pretrained(str(tmp_path), mesh=mesh, scan_layers=True)
  _assert_split(scanned, mesh)
  assert scanned.layers.mlp.up_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (4, 9, 2)]
  kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, seed=3, eos_ids=[2])
  got = sampler.generate(scanned, prompts, mesh=mesh, **kw)
  want = sampler.generate(single, prompts, **kw)  # test_sharded_sampler_matches_one_device's
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_logical_to_spec_rules(mesh):
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # 3 kv heads do not divide over tensor=2: replicated rather than an error.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh) == P(
    "fsdp", None, None
  )
  # A mesh axis is used at most once per array.
  assert sharding.logical_to_spec(("heads", "kv_heads"), (4, 4), mesh) == P("tensor", None)
  assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)


def test_make_mesh_checks_its_shape():
  assert sharding.make_mesh().shape == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 2)]).shape["fsdp"] == 4
  with pytest.raises(ValueError, match="mesh axes"):
    sharding.make_mesh([("data", 8), ("model", 1), ("tensor", 1)])
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh([("data", 3), ("fsdp", 1), ("tensor", 1)])
