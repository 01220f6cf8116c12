"""The planner's vocabulary (tools.plan): chips and their HBM, known architectures, the lines of a
plan and the fit check. Pure data; what each line counts is in docs/memory_model.md."""

import dataclasses

from omniopd_jax.models import lm as model

GIB = 1024**3

# HBM per chip (per GPU), GiB.
HBM_GIB = {"v5e": 16, "v5p": 95, "v6e": 32, "H100": 80, "H200": 141}

# transformers config.json fields of the real checkpoints (the architecture numbers only).
_QWEN3 = dict(
  model_type="qwen3", vocab_size=151936, num_hidden_layers=28, num_attention_heads=16,
  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=1000000.0,
  rms_norm_eps=1e-6, max_position_embeddings=40960,
)  # fmt: skip
PRESETS = {
  "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144),
  "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072),
  "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                   num_attention_heads=32),
  "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                   num_attention_heads=32, tie_word_embeddings=False),
  "llama3.2-1b": dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192),
  ),
  "smollm2-135m": dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
  ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Line:
  name: str  # stable key, e.g. "params"
  label: str  # what is printed
  phase: str  # resident | rollout | update
  bytes: int  # per device
  formula: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
  lines: tuple[Line, ...]
  mesh: dict[str, int]
  model: model.ModelConfig
  notes: tuple[str, ...] = ()

  def __getitem__(self, name: str) -> int:
    return sum(line.bytes for line in self.lines if line.name == name)

  def phase(self, phase: str) -> int:
    """Bytes of one phase; for rollout, the largest of its alternatives (train, eval, drafts)."""
    if phase == "rollout":
      temps = self["rollout_temporaries"]
      kv = [line.bytes for line in self.lines if line.name.startswith("kv_cache")]
      return max(kv, default=0) + temps
    return sum(line.bytes for line in self.lines if line.phase == phase)

  @property
  def peak(self) -> int:
    return self.phase("resident") + max(self.phase("rollout"), self.phase("update"))


def fits(peak: int, accelerator: str, headroom: float = 0.1) -> tuple[bool, int]:
  """(fits, usable bytes): the peak must stay within HBM x (1 - headroom)."""
  if accelerator not in HBM_GIB:
    raise ValueError(f"unknown accelerator {accelerator!r}: choose from {sorted(HBM_GIB)}")
  if not 0.0 <= headroom < 1.0:
    raise ValueError(f"headroom={headroom} must be in [0, 1)")
  usable = int(HBM_GIB[accelerator] * GIB * (1.0 - headroom))
  return peak <= usable, usable
