"""Chunk rewards (host side, numpy): soft agreement counts, the Dirichlet (Beta-Binomial) posterior,
the chunk-weight forms, and the padded [B, M] arrays the train step takes, with diagnostics.
"""

import dataclasses
import os

import numpy as np

WEIGHT_FORMS = ("pi_hat", "centered", "group")
# Credit inside a chunk (omniopd.token_credit): "none" gives every token the chunk's weight;
# "prefix" and "decision" read where each teacher sample first differs from the student's chunk.
TOKEN_CREDITS = ("none", "prefix", "decision")


def soft_counts(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Soft agreement count k = nansum_j phi_j and N_valid = #non-NaN samples.

  Args:
    sim: [..., N] similarities in [0, 1], NaN where the teacher sample failed or was not asked.

  Returns:
    k [...] float32 and n_valid [...] int32.
  """
  sim = np.asarray(sim, np.float32)
  return np.nansum(sim, axis=-1, dtype=np.float32), (~np.isnan(sim)).sum(axis=-1).astype(np.int32)


def pi_bar_from_logprobs(chunk_logprobs: np.ndarray) -> np.ndarray:
  """pi_bar = exp(mean_t log pi_theta(y_t)) over the last axis: the geometric-mean token prob.

  Args:
    chunk_logprobs: [..., C] log-probs of the chunk's sampled tokens.
  """
  return np.exp(np.mean(np.asarray(chunk_logprobs, np.float64), axis=-1)).astype(np.float32)


def chunk_pi_bar(
  token_logprobs: np.ndarray, starts: np.ndarray, valid: np.ndarray, chunk_len: int
) -> np.ndarray:
  """pi_bar of every fork's chunk from the rollout's per-token log-probs.

  Args:
    token_logprobs: [B, L] log pi_theta(y_t) of the generated tokens (position 0 = first).
    starts, valid: [B, M] from forks.select_forks; chunks must fit (t + C <= L).
    chunk_len: C.

  Returns:
    [B, M] float32, 0 where valid is False.
  """
  token_logprobs = np.asarray(token_logprobs, np.float32)
  starts, valid = np.asarray(starts), np.asarray(valid, bool)
  idx = starts[..., None] + np.arange(chunk_len)  # [B, M, C]
  idx = np.where(valid[..., None], idx, 0)
  if (idx >= token_logprobs.shape[1]).any():
    raise ValueError(
      f"chunk_pi_bar: a valid chunk of {chunk_len} runs past L = {token_logprobs.shape[1]}."
    )
  lp = np.take_along_axis(token_logprobs[:, None, :], idx, axis=2)  # [B, M, C]
  return np.where(valid, pi_bar_from_logprobs(lp), 0.0).astype(np.float32)


def dirichlet_posterior(k, n_valid, pi_bar, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """Posterior mean agreement pi_hat = (k + alpha * pi_bar) / (n_valid + alpha), elementwise.

  A Beta(alpha * pi_bar, alpha * (1 - pi_bar)) prior centred on the student's own belief, updated
  with k soft successes out of n_valid. alpha = 0 is the "no prior" ablation k / n_valid.
  Chunks with n_valid == 0 (every teacher sample failed, or no fork) are unaudited: audited is
  False and pi_hat is 0 there, which must be read through the mask, never as zero agreement.

  Returns:
    pi_hat float32 in [0, 1] and audited bool, both of the broadcast shape.
  """
  if not np.isscalar(alpha) or alpha < 0:
    raise ValueError(f"dirichlet_posterior: alpha must be a scalar >= 0, got {alpha!r}.")
  k = np.asarray(k, np.float64)
  n_valid = np.asarray(n_valid, np.float64)
  pi_bar = np.asarray(pi_bar, np.float64)
  if (k < -1e-6).any() or (k > n_valid + 1e-4).any():
    raise ValueError("dirichlet_posterior: need 0 <= k <= n_valid (k sums similarities in [0, 1]).")
  if ((pi_bar < 0) | (pi_bar > 1 + 1e-6)).any():
    raise ValueError("dirichlet_posterior: pi_bar must be a probability in [0, 1].")
  audited = np.broadcast_to(n_valid > 0, np.broadcast_shapes(k.shape, n_valid.shape, pi_bar.shape))
  num = k + alpha * pi_bar
  den = np.broadcast_to(n_valid + alpha, num.shape)
  pi_hat = np.divide(num, den, out=np.zeros(audited.shape), where=audited)
  return np.clip(pi_hat, 0.0, 1.0).astype(np.float32), audited.copy()


def divergence_tokens(student_text: str, token_ends, teacher_texts) -> np.ndarray:
  """Per teacher sample, the first chunk token not inside its common prefix with the student.

  Token t of the student's chunk covers characters [.., token_ends[t]) of `student_text`; it is
  inside the common prefix with sample z when token_ends[t] <= len(common prefix of text and z).

  Args:
    student_text: the student's chunk as scored; token_ends: [C] non-decreasing character end of
      each chunk token in it; teacher_texts: N samples (None = failed: C).

  Returns:
    [N] int32 in [0, C]: C when the sample reproduces the whole chunk.
  """
  ends = np.asarray(token_ends)
  out = np.full(len(teacher_texts), len(ends), np.int32)
  for j, z in enumerate(teacher_texts):
    if z is not None:
      common = len(os.path.commonprefix((student_text, z)))
      out[j] = np.searchsorted(ends, common, side="right")
  return out


def token_agreement(sim, diverge, chunk_len: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Soft agreement counts per chunk token, from where each teacher sample leaves the chunk.

  Sample j agrees with every token before its divergence point d_j (a_jt = 1). "prefix": the
  tokens from d_j on get the chunk's phi_j. "decision": only token d_j itself gets phi_j (the
  token where the student decided differently); the tokens after it follow from that decision,
  so sample j says nothing about them (not counted). Failed samples (NaN phi) count nowhere.

  Args:
    sim: [..., N] phi of the chunk against each sample; diverge: [..., N] int from
      divergence_tokens; chunk_len: C; mode: "prefix" | "decision".

  Returns:
    k [..., C] float32 and n_valid [..., C] int32 (what dirichlet_posterior takes, per token).
  """
  if mode not in TOKEN_CREDITS[1:]:
    raise ValueError(f"token_agreement: mode must be one of {TOKEN_CREDITS[1:]}, got {mode!r}.")
  sim = np.asarray(sim, np.float32)[..., None]  # [..., N, 1]
  d = np.asarray(diverge)[..., None]  # [..., N, 1]
  t = np.arange(chunk_len)  # [C]
  phi = np.nan_to_num(sim, nan=0.0)
  counted = ~np.isnan(sim) & ((t <= d) if mode == "decision" else (t >= 0))  # [..., N, C]
  a = np.where(t < d, 1.0, phi)  # [..., N, C]
  k = np.where(counted, a, 0.0).sum(axis=-2, dtype=np.float32)
  return k, counted.sum(axis=-2).astype(np.int32)


def _audited_mean(x: np.ndarray, audited: np.ndarray) -> float:
  return float(x[audited].mean()) if audited.any() else 0.0


def chunk_weights(pi_hat, audited, form: str, group_pi_hat=None) -> np.ndarray:
  """The chunk weight w_c of the loss, 0 on unaudited chunks.

  Forms: "pi_hat" (the paper's reconstruction, all non-negative); "centered": pi_hat here, centred
  on the device over the global batch (methods.omniopd.center_fork_weights, the one place the
  centred weight is computed); "group": pi_hat minus the mean over the K drafts at the same fork
  (`group_pi_hat` [B, M, K], draft 0 = the own chunk).

  Args:
    pi_hat, audited: [B, M] from dirichlet_posterior.

  Returns:
    [B, M] float32.
  """
  pi_hat = np.asarray(pi_hat, np.float32)
  audited = np.asarray(audited, bool)
  if form in ("pi_hat", "centered"):
    w = pi_hat
  elif form == "group":
    if group_pi_hat is None or np.shape(group_pi_hat)[:-1] != pi_hat.shape:
      raise ValueError(
        f"form='group' needs group_pi_hat of shape {pi_hat.shape + ('K',)}, got {np.shape(group_pi_hat)}."
      )
    w = pi_hat - np.asarray(group_pi_hat, np.float32).mean(axis=-1)
  else:
    raise ValueError(f"Unknown chunk weight form {form!r}; choose one of {WEIGHT_FORMS}.")
  return np.where(audited, w, 0.0).astype(np.float32)


@dataclasses.dataclass
class RewardArrays:
  """Padded per-fork rewards. `weight` and `mask` go to losses.chunk_token_weights."""

  weight: np.ndarray  # [B, M] float32 chunk weight w_c (0 where mask is False)
  mask: np.ndarray  # [B, M] bool: audited (>= 1 teacher sample came back)
  pi_hat: np.ndarray  # [B, M] float32 posterior agreement of the own chunk
  pi_bar: np.ndarray  # [B, M] float32 prior mean (the student's own geometric-mean prob)
  k: np.ndarray  # [B, M] float32 soft agreement count
  n_valid: np.ndarray  # [B, M] int32 teacher samples that came back
  num_samples: int  # N asked per fork
  draft_pi_hat: np.ndarray | None = None  # [B, M, K] for form "group"
  token_weight: np.ndarray | None = None  # [B, M, C] per-token weight (token_credit), else None
  token_mask: np.ndarray | None = None  # [B, M, C] bool tokens some sample speaks for


def build_reward_arrays(
  sim,
  pi_bar,
  *,
  alpha: float = 1.0,
  form: str = "pi_hat",
  use_prior: bool = True,
  token_credit: str = "none",
  diverge=None,
  chunk_len: int = 0,
) -> RewardArrays:
  """From similarities to the [B, M] weight and mask arrays.

  Args:
    sim: [B, M, N] phi of the own chunk against each teacher sample, NaN where the sample failed
      or the slot has no fork (ForkRequests.scatter fills NaN). For form "group": [B, M, K, N]
      with draft 0 the student's own chunk.
    pi_bar: [B, M] (group: [B, M, K]) from chunk_pi_bar.
    alpha: prior strength (SPEC default 1.0).
    form: one of WEIGHT_FORMS.
    use_prior: False is the "no prior" ablation pi_hat = k / n_valid.
    token_credit: "none", or "prefix" / "decision" (token_agreement): then each chunk token gets
      its own posterior (k_t + alpha * pi_bar) / (n_t + alpha) in `token_weight` [B, M, C].
    diverge: [B, M, N] int from divergence_tokens (any value where sim is NaN), and chunk_len:
      C; token credit only.
  """
  sim = np.asarray(sim, np.float32)
  pi_bar = np.asarray(pi_bar, np.float32)
  group = form == "group"
  if sim.ndim != (4 if group else 3) or pi_bar.shape != sim.shape[:-1]:
    want = "[B, M, K, N] and pi_bar [B, M, K]" if group else "[B, M, N] and pi_bar [B, M]"
    raise ValueError(
      f"build_reward_arrays(form={form!r}) needs sim {want}; got {sim.shape}, {pi_bar.shape}."
    )
  k, n_valid = soft_counts(sim)
  pi_hat, audited = dirichlet_posterior(k, n_valid, pi_bar, alpha if use_prior else 0.0)
  own = (lambda x: x[..., 0]) if group else (lambda x: x)
  weight = chunk_weights(own(pi_hat), own(audited), form, group_pi_hat=pi_hat if group else None)
  token_weight = token_mask = None
  if token_credit != "none":
    if group or diverge is None or np.shape(diverge) != sim.shape or chunk_len < 1:
      raise ValueError(
        f"token_credit={token_credit!r} needs form 'pi_hat' or 'centered', diverge of shape "
        f"{sim.shape} and chunk_len >= 1; got form {form!r}, diverge {np.shape(diverge)}, "
        f"chunk_len {chunk_len}."
      )
    k_t, n_t = token_agreement(sim, diverge, chunk_len, token_credit)
    pi_t, token_mask = dirichlet_posterior(k_t, n_t, pi_bar[..., None], alpha if use_prior else 0.0)
    token_weight = np.where(token_mask, pi_t, 0.0).astype(np.float32)
  return RewardArrays(
    weight=weight,
    mask=own(audited).copy(),
    pi_hat=own(pi_hat).copy(),
    pi_bar=own(pi_bar).copy(),
    k=own(k).copy(),
    n_valid=own(n_valid).copy(),
    num_samples=int(sim.shape[-1]),
    draft_pi_hat=pi_hat if group else None,
    token_weight=token_weight,
    token_mask=token_mask,
  )


def reward_metrics(rewards: RewardArrays, fork_valid=None, num_bins: int = 10) -> dict[str, float]:
  """Diagnostics of one step's rewards (means over audited chunks).

  Args:
    rewards: from build_reward_arrays.
    fork_valid: [B, M] bool forks that were sent to the teacher (default: the audited ones).
    num_bins: bins of the pi_hat histogram over [0, 1].

  Returns:
    omniopd/{pi_hat_mean, pi_bar_mean, k_mean, weight_mean, weight_std, n_valid_frac,
    audited_frac, num_audited}, omniopd/pi_hat_hist/<lo> (fraction of audited chunks per bin)
    and omniopd/pi_hat (the audited chunks' pi_hat values, an array: a histogram when logged).
  """
  audited = rewards.mask
  asked = audited if fork_valid is None else np.asarray(fork_valid, bool)
  num_asked = int(asked.sum())
  weights = rewards.weight[audited]
  metrics = {
    "omniopd/pi_hat_mean": _audited_mean(rewards.pi_hat, audited),
    "omniopd/pi_bar_mean": _audited_mean(rewards.pi_bar, audited),
    "omniopd/k_mean": _audited_mean(rewards.k, audited),
    "omniopd/weight_mean": float(weights.mean()) if weights.size else 0.0,
    "omniopd/weight_std": float(weights.std()) if weights.size else 0.0,
    "omniopd/n_valid_frac": float(rewards.n_valid[asked].sum())
    / max(num_asked * rewards.num_samples, 1),
    "omniopd/audited_frac": float(audited[asked].sum()) / max(num_asked, 1),
    "omniopd/num_audited": float(audited.sum()),
  }
  counts, edges = np.histogram(rewards.pi_hat[audited], bins=num_bins, range=(0.0, 1.0))
  for lo, c in zip(edges[:-1], counts):
    metrics[f"omniopd/pi_hat_hist/{lo:.2f}"] = float(c) / max(int(audited.sum()), 1)
  if rewards.token_mask is not None:  # token credit: how much of the audited chunks is spoken for
    tokens = rewards.token_mask & audited[..., None]
    metrics["omniopd/token_credit_frac"] = float(tokens.sum()) / max(
      int(audited.sum()) * tokens.shape[-1], 1
    )
    metrics["omniopd/token_pi_hat_mean"] = (
      float(rewards.token_weight[tokens].mean()) if tokens.any() else 0.0
    )
  # The exact values too: the metrics writer turns an array into a TensorBoard histogram.
  metrics["omniopd/pi_hat"] = rewards.pi_hat[audited].astype(np.float32)  # [num_audited]
  return metrics
