"""The Flax model family on its own: KV-cache consistency, parameter counts, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax.models import layer_scan
from omniopd_jax.models import lm as model_lib

TINY = dict(
  vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
  num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


@pytest.mark.parametrize("architecture,extra", [("llama", {}), ("qwen2", {"qkv_bias": True}),
                                                ("qwen3", {"qk_norm": True, "head_dim": 16})])  # fmt: skip
def test_kv_cache_decode_equals_full_forward(architecture, extra):
  cfg = model_lib.ModelConfig(architecture=architecture, **TINY, **extra)
  model = model_lib.CausalLM(cfg, rngs=nnx.Rngs(1))
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 64, size=(2, 9))
  mask = np.ones((2, 9), bool)
  mask[0, :3] = False  # row 0 is left-padded
  full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

  # Prefill 6 tokens into a 12-slot cache, then decode the remaining 3 one at a time.
  cache = model.init_cache(2, 12)
  slot_mask = np.zeros((2, 12), bool)
  slot_mask[:, :6] = mask[:, :6]
  logits, cache = model(
    jnp.asarray(ids[:, :6]), jnp.asarray(slot_mask), jnp.asarray(positions[:, :6]),
    cache=cache, cache_index=0,
  )  # fmt: skip
  np.testing.assert_allclose(np.asarray(logits)[mask[:, :6]], full[:, :6][mask[:, :6]], atol=1e-5)
  for t in range(6, 9):
    slot_mask[:, t] = True
    logits, cache = model(
      jnp.asarray(ids[:, t : t + 1]), jnp.asarray(slot_mask), jnp.asarray(positions[:, t : t + 1]),
      cache=cache, cache_index=t,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5)


def test_num_params_matches_the_tree():
  for extra in ({}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True}, {"qk_norm": True},
                {"tie_word_embeddings": True}):  # fmt: skip
    cfg = model_lib.ModelConfig(**TINY, **extra)
    abstract = model_lib.abstract_model(cfg)
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == cfg.num_params()


def test_every_param_has_logical_axes_of_its_rank():
  cfg = model_lib.ModelConfig(**TINY, qkv_bias=True, qk_norm=True)
  state = nnx.state(model_lib.abstract_model(cfg), nnx.Param)
  for path, v in nnx.to_flat_state(state):
    axes = v.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(v.shape), path


def test_bad_configs_are_rejected_with_the_field_name():
  with pytest.raises(ValueError, match="rope_type"):
    model_lib.ModelConfig(**TINY, rope_type="yarn")
  with pytest.raises(ValueError, match="num_key_value_heads"):
    model_lib.ModelConfig(**{**TINY, "num_key_value_heads": 3})
  with pytest.raises(ValueError, match="cache_index"):
    cfg = model_lib.ModelConfig(**TINY)
    m = model_lib.CausalLM(cfg)
    m(jnp.zeros((1, 1), jnp.int32), cache=m.init_cache(1, 4))


FAMILIES = [("llama", {}), ("qwen2", {"qkv_bias": True}),
            ("qwen3", {"qk_norm": True, "head_dim": 16})]  # fmt: skip


@pytest.mark.parametrize("architecture,extra", FAMILIES)
@pytest.mark.parametrize("attention", ["blockwise", "xla"])
def test_fused_attention_equals_dense_on_real_tokens(architecture, extra, attention):
  """Left-padded prompt + right-padded response rows: the update's layout."""
  cfg = model_lib.ModelConfig(architecture=architecture, **TINY, **extra)
  model = model_lib.CausalLM(cfg, rngs=nnx.Rngs(2))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(3, 21)))
  mask = np.ones((3, 21), bool)
  mask[0, :4] = mask[1, 15:] = False
  mask[2, :2] = mask[2, 19:] = False
  dense = model.hidden_states(ids, jnp.asarray(mask))
  fused = model.hidden_states(ids, jnp.asarray(mask), attention=attention)
  np.testing.assert_allclose(np.asarray(fused)[mask], np.asarray(dense)[mask], atol=1e-4)


def test_packed_rows_equal_the_sequences_alone():
  """Two sequences packed in one row with segment ids and restarting positions."""
  cfg = model_lib.ModelConfig(architecture="qwen3", **TINY, qk_norm=True)
  model = model_lib.CausalLM(cfg, rngs=nnx.Rngs(3))
  rng = np.random.RandomState(1)
  a, b = rng.randint(0, 64, size=(1, 7)), rng.randint(0, 64, size=(1, 5))
  packed = jnp.asarray(np.concatenate([a, b], 1))
  seg = jnp.asarray([[1] * 7 + [2] * 5])
  pos = jnp.asarray([list(range(7)) + list(range(5))])
  alone = [np.asarray(model.hidden_states(jnp.asarray(x))) for x in (a, b)]
  for attention in ("dense", "blockwise"):
    out = np.asarray(model.hidden_states(packed, None, pos, segment_ids=seg, attention=attention))
    np.testing.assert_allclose(out[:, :7], alone[0], atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], alone[1], atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_chunked_mlp_gives_the_same_values_and_gradients(remat):
  # mlp_chunk runs each layer's MLP over sequence chunks (ops/token_chunks), recomputed in the
  # backward pass; 11 tokens in chunks of 4 also exercises the padded last chunk.
  cfg = model_lib.ModelConfig(architecture="qwen3", **TINY, qk_norm=True, head_dim=16)
  graphdef, params = nnx.split(model_lib.CausalLM(cfg, rngs=nnx.Rngs(3)), nnx.Param)
  rng = np.random.RandomState(1)
  ids = jnp.asarray(rng.randint(0, 64, size=(2, 11)))
  mask = jnp.asarray(np.arange(11)[None] >= np.array([[0], [3]]))  # row 1 left-padded

  def loss(params, chunk):
    hidden = nnx.merge(graphdef, params).hidden_states(
      ids, mask, remat=remat, attention="blockwise", mlp_chunk=chunk
    )
    return jnp.sum(jnp.where(mask[..., None], jnp.sin(hidden), 0.0)), hidden

  (ref, ref_hidden), ref_grads = jax.value_and_grad(loss, has_aux=True)(params, 0)
  (out, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params, 4)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(out), float(ref), rtol=1e-5, atol=1e-5)  # a sum of ~200
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    r = np.asarray(r)  # float32 sums in another order: 1e-5 of the tensor's scale
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


SCAN_CASES = [("llama", {}), ("llama", {"tie_word_embeddings": True}),
              ("qwen3", {"qk_norm": True, "head_dim": 16}),
              ("qwen3", {"qk_norm": True, "head_dim": 16, "tie_word_embeddings": True})]  # fmt: skip


def _unrolled_and_scanned(architecture, extra, layers=3, seed=4):
  """The same weights (one seed draws them in the same order) unrolled and stacked [L, ...]."""
  cfg = model_lib.ModelConfig(architecture=architecture, **{**TINY, "num_hidden_layers": layers},
                              **extra)  # fmt: skip
  build = lambda scan: model_lib.CausalLM(
    dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(seed)
  )
  return build(False), build(True)


def _assert_same_tree(unrolled, scanned, **tol):
  """Parameter-shaped trees of both layouts: unrolled layer i equals stacked index i."""
  stacked = dict(nnx.to_flat_state(scanned))
  flat = list(nnx.to_flat_state(unrolled))
  for path, value in flat:
    if path[0] == "layers":
      want, got = value[...], stacked[("layers", *path[2:])][...][path[1]]
    else:
      want, got = value[...], stacked[path][...]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=str(path), **tol)
  assert len(stacked) == len([p for p in flat if p[0][0] != "layers" or p[0][1] == 0])


@pytest.mark.parametrize("architecture,extra", SCAN_CASES)
def test_scanned_layers_equal_unrolled_logits_and_gradients(architecture, extra):
  unrolled, scanned = _unrolled_and_scanned(architecture, extra)
  assert scanned.layers.mlp.up_proj.kernel.get_metadata()["logical_axes"][0] == "layers"
  _assert_same_tree(nnx.state(unrolled, nnx.Param), nnx.state(scanned, nnx.Param), rtol=0, atol=0)
  rng = np.random.RandomState(5)
  ids = jnp.asarray(rng.randint(0, 64, size=(2, 10)))
  mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [3]]))  # row 1 left-padded

  def loss(params, graphdef):
    logits = nnx.merge(graphdef, params)(ids, attention_mask=mask)
    loss = jnp.where(mask[..., None], jax.nn.log_softmax(logits) * jnp.cos(logits), 0.0).sum()
    return loss, logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, want), grads = grad_fn(*reversed(nnx.split(unrolled, nnx.Param)))
  (_, got), scanned_grads = grad_fn(*reversed(nnx.split(scanned, nnx.Param)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  _assert_same_tree(grads, scanned_grads, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_keep_values_and_save_what_they_say(scan_layers):
  unrolled, scanned = _unrolled_and_scanned("qwen3", SCAN_CASES[2][1], layers=2)
  model = scanned if scan_layers else unrolled
  graphdef, params = nnx.split(model, nnx.Param)
  ids = jnp.asarray(np.random.RandomState(6).randint(0, 64, size=(2, 11)))
  saved, results = {}, {}
  for remat in (*layer_scan.REMAT_POLICIES, True):
    f = lambda p, r=remat: jnp.sin(nnx.merge(graphdef, p).hidden_states(ids, remat=r)).sum()
    vjp = jax.eval_shape(lambda p, f=f: jax.vjp(f, p)[1], params)
    saved[remat] = sum(x.size for x in jax.tree.leaves(vjp))  # residuals (parameters included)
    results[remat] = jax.jit(jax.value_and_grad(f))(params)
  ref_value, ref_grads = results["none"]
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for value, grads in results.values():
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6 * scale)
  # Only the layer input < + attention projections < + the MLP's matmuls < everything.
  assert saved["full"] == saved[True] < saved["dots_except_mlp"] < saved["dots"] < saved["none"]
  with pytest.raises(ValueError, match="remat"):
    model.hidden_states(ids, remat="everything")


def test_scanned_kv_cache_decode_equals_unrolled():
  unrolled, scanned = _unrolled_and_scanned("qwen3", SCAN_CASES[2][1])
  cache = scanned.init_cache(2, 8)
  assert isinstance(cache, layer_scan.StackedKVCache) and cache.k.shape[:2] == (3, 2)
  ids = jnp.asarray(np.random.RandomState(7).randint(0, 64, size=(2, 6)))
  slot_mask = jnp.asarray(np.arange(8)[None] < 5).repeat(2, 0)
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  caches, outs = [], []
  for model in (unrolled, scanned):
    logits, cache = model(ids[:, :5], slot_mask, positions, cache=model.init_cache(2, 8),
                          cache_index=0)  # fmt: skip
    step, cache = model(ids[:, 5:], slot_mask.at[:, 5].set(True), positions[:, -1:] + 1,
                        cache=cache, cache_index=5)  # fmt: skip
    outs.append((logits, step))
    caches.append(cache)
  for a, b in zip(*outs):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  assert caches[1].layer is None
  for i, (k, v) in enumerate(caches[0]):
    np.testing.assert_allclose(np.asarray(caches[1].k[i]), np.asarray(k), atol=1e-6)
    np.testing.assert_allclose(np.asarray(caches[1].v[i]), np.asarray(v), atol=1e-6)
  with pytest.raises(ValueError, match="stacked cache"):
    scanned(ids, cache=unrolled.init_cache(2, 8), cache_index=0, positions=positions)
