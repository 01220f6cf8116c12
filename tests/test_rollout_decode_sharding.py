"""Decode sharding on 8 fake CPU devices: the compiled decode gathers no weights once they are
resharded to the decode layout, and rows sampled on the mesh equal rows sampled on one device."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omniopd_jax import sharding
from omniopd_jax.models import lm
from omniopd_jax.rollout import decode_sharding, sampler

CFG = lm.ModelConfig(
  vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
  num_attention_heads=4, num_key_value_heads=2, head_dim=16, architecture="qwen3", qk_norm=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_model():
  """The student as training holds it: every weight split over fsdp=8."""
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 8), ("tensor", 1)])
  with jax.set_mesh(mesh):
    model = sharding.create_sharded(lambda: lm.CausalLM(CFG, rngs=nnx.Rngs(0)), mesh)
  return model, mesh


def _collectives(hlo: str) -> list[tuple[str, str]]:
  """(result dtype, op) of every collective in a compiled HLO module."""
  ops = "|".join(decode_sharding.COLLECTIVES)
  return re.findall(rf"= \(?(\w+)\[[^=\n]*? ({ops})(?:-start)?\(", hlo)


def _compiled_decode(model, mesh, rules):
  graphdef, state = nnx.split(model)
  options = sampler.SamplingOptions(8, temperature=1.0, eos_ids=(2,))
  fn = sampler.make_generate_fn(graphdef, options, mesh=mesh, rules=rules, state=state)
  tokens, mask = sampler.pad_prompts([[5, 6, 7]] * 8)
  caps = np.full(8, 8, np.int32)
  return fn.jitted.lower(state, tokens, mask, np.uint32(0), caps).compile().as_text()


def test_decode_layout_gathers_no_weights(fsdp_model):
  model, mesh = fsdp_model
  train = _collectives(_compiled_decode(model, mesh, sharding.DEFAULT_RULES))
  # The training layout gathers weights (float arrays) inside the decode step.
  assert any(op == "all-gather" and kind.startswith(("f32", "bf16")) for kind, op in train), train
  state, rules = decode_sharding.decode_layout_state(model, mesh, layout="replicated")
  assert all(v.sharding.is_fully_replicated for v in jax.tree.leaves(state))
  replicated = nnx.merge(nnx.graphdef(model), state)
  decode = _collectives(_compiled_decode(replicated, mesh, rules))
  # Left: only tiny integer/bool bookkeeping (prompt digests for the row keys, "every row done").
  assert not any(kind.startswith(("f32", "bf16", "f16")) for kind, _ in decode), decode
  assert len(decode) < len(train) / 4, (decode, train)
  # The training copy keeps its own (fsdp) layout: the decode copy is a second one.
  (embed,) = jax.tree.leaves(nnx.state(model)["embed_tokens"])
  assert embed.sharding.spec == P(None, "fsdp")


def test_rows_on_the_mesh_equal_rows_on_one_device(fsdp_model):
  model, mesh = fsdp_model
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 96, n).tolist() for n in (3, 9, 5, 12, 1, 7)]
  kw = dict(max_new_tokens=10, temperature=1.0, eos_ids=[2, 3, 4], seed=4, num_samples=2)
  single = nnx.merge(nnx.graphdef(model), jax.device_get(nnx.state(model)))
  alone = sampler.generate(single, prompts, **kw)
  for layout, engine in (("auto", "continuous"), ("train", "static")):
    on_mesh = sampler.generate(model, prompts, mesh=mesh, decode_layout=layout, engine=engine, **kw)
    assert sampler.last_stats()["engine"] == engine
    np.testing.assert_array_equal(on_mesh.tokens, alone.tokens)
    np.testing.assert_array_equal(on_mesh.mask, alone.mask)
    np.testing.assert_allclose(on_mesh.logprobs, alone.logprobs, atol=1e-4)


def test_decode_rules():
  rules = decode_sharding.decode_rules(sharding.DEFAULT_RULES, replicate=False)
  table = dict(rules)
  assert table["batch"] == ("data", "fsdp") and table["embed"] is None
  assert table["mlp"] == table["heads"] == table["vocab"] == "tensor"
  assert all(t is None for n, t in decode_sharding.decode_rules() if n != "batch")
  with pytest.raises(ValueError, match="layout"):
    decode_sharding.decode_layout_state({}, None, layout="fsdp")
