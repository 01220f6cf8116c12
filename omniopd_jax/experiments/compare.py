"""Side-by-side comparison on the demo task: SFT, white-box OPD (sampled-token and full-vocabulary),
GRPO and OmniOPD (each chunk-weight form), with ablations, a different-tokenizer teacher and a
style-shift teacher (the same solutions in another surface form: where token-level OPD is brittle).

  python -m omniopd_jax.experiments.compare --workdir=/tmp/cmp               # full, 2-core CPU
  python -m omniopd_jax.experiments.compare --workdir=/tmp/cmp --quick       # minutes, 1 seed
  python -m omniopd_jax.experiments.compare --workdir=/tmp/cmp --models=/tmp/demo/models
  python -m omniopd_jax.experiments.compare --workdir=W --style_teacher=T --only=style-shift-omniopd

Every run starts from the same student base with the same teacher, prompts and number of student
samples per step (`batch_size`; GRPO spends it as batch_size / group_size prompts x group_size).
Runs happen in this process through `train.run`; the teacher is one `omniopd_jax.serve` subprocess
shared by all OmniOPD runs. Finished runs are skipped when the command is repeated (each run dir
keeps a result.json). Writes <workdir>/results.md, results.json and accuracy.png.
"""

import ast
import dataclasses
import glob
import json
import os
import shutil
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the models, runs, results.md and accuracy.png go.")
flags.DEFINE_bool("quick", False, "Plumbing check: untrained tiny models, 2 steps, 1 seed, 1 lr.")
flags.DEFINE_integer("seeds", 0, "Seeds per (variant, learning rate); 0 = 3 (1 with --quick).")
flags.DEFINE_integer(
  "steps", 0, "Optimizer steps per run; 0 = the :demo config's (2 with --quick)."
)
flags.DEFINE_string("models", "", "A directory with student/ and teacher/ HF dirs to reuse.")
flags.DEFINE_string("lrs", "", "Comma-separated learning rates (default: METHOD_LRS).")
flags.DEFINE_string("only", "", "Comma-separated variant names to run (default all).")
flags.DEFINE_bool(
  "report_only", False, "Only rebuild results.md / accuracy.png from finished runs."
)
flags.DEFINE_string("style_teacher", "", "Style-shift teacher HF dir ('' trains one in WORKDIR).")
flags.DEFINE_multi_string("set", [], "FIELD=VALUE config override for every run (repeatable), "
                          "e.g. --set=omniopd.num_teacher_samples=8.")  # fmt: skip

# Learning-rate grids: dense supervision (sft, opd) tolerates larger steps than the on-policy
# estimators; OmniOPD's grid brackets the :demo rate (1.5e-4; the demo degrades at 2e-4).
METHOD_LRS = {"sft": (1e-4, 3e-4), "opd": (1e-4, 3e-4), "grpo": (3e-5, 1e-4),
              "omniopd": (1e-4, 1.5e-4, 3e-4)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # the row label
  method: str  # config.method
  overrides: tuple = ()  # ((dotted config field, value), ...)
  sweep: bool = True  # sweep METHOD_LRS (else the :demo config's learning rate only)
  other_tokenizer: bool = False  # the teacher uses a different tokenizer (same weights)
  style_shift: bool = False  # the teacher writes another surface form (demo_models, "shifted")
  group: str = "method"  # method | ablation | tokenizer | style
  lr: float = 0.0  # without sweep: this learning rate (0: the :demo config's)


_OTHER_TOK = dict(sweep=False, other_tokenizer=True, group="tokenizer")
_SHIFT = dict(sweep=False, style_shift=True, group="style")
_CENTRED = (("omniopd.weight_form", "centered"),)
VARIANTS = (
  Variant("sft", "sft"),
  Variant("opd-sampled", "opd", (("opd.estimator", "sampled"),)),
  Variant("opd-full-vocab", "opd", (("opd.estimator", "full_vocab"),)),
  Variant("grpo", "grpo"),
  Variant("omniopd-pi_hat", "omniopd", (("omniopd.weight_form", "pi_hat"),)),
  Variant("omniopd-centered", "omniopd", _CENTRED),
  Variant("omniopd-group", "omniopd", (("omniopd.weight_form", "group"),)),
  Variant("omniopd-prefix", "omniopd", (*_CENTRED, ("omniopd.token_credit", "prefix"))),
  Variant("omniopd-decision", "omniopd", (*_CENTRED, ("omniopd.token_credit", "decision"))),
  *(
    Variant(name, "omniopd", (*_CENTRED, *o), sweep=False, group="ablation")
    for name, o in (
      ("ablate-no-kl", (("omniopd.kl_anchor", False),)),
      ("ablate-no-prior", (("omniopd.use_prior", False),)),
      ("ablate-random-forks", (("omniopd.fork_method", "random"),)),
      ("ablate-phi-edit", (("scoring.phi", "edit"),)),
      ("ablate-phi-rouge1", (("scoring.phi", "rouge1"),)),
      ("ablate-phi-exact", (("scoring.phi", "exact"),)),
    )
  ),
  Variant("other-tokenizer-omniopd", "omniopd", _CENTRED, **_OTHER_TOK),
  Variant("other-tokenizer-opd", "opd", **_OTHER_TOK),
  # Each at its best learning rate of the method table (docs/compare_results.md).
  Variant(
    "style-shift-opd-full-vocab", "opd", (("opd.estimator", "full_vocab"),), **_SHIFT, lr=3e-4
  ),  # fmt: skip
  Variant("style-shift-opd-sampled", "opd", (("opd.estimator", "sampled"),), **_SHIFT, lr=1e-4),
  Variant("style-shift-omniopd", "omniopd", _CENTRED, **_SHIFT, lr=1.5e-4),
)


# ----------------------------------------------------------------------------- models


def base_config(quick: bool):
  """The :demo config, unlocked; --quick shrinks it to seconds per run."""
  from omniopd_jax.configs import math as math_config

  config = math_config.get_config("demo")
  config.unlock()
  if quick:
    config.batch_size = 8
    config.rollout.max_new_tokens = 32
    config.eval.num_examples = config.data.eval_size = 8
    config.eval.batch_size = 8
    config.omniopd.update(num_forks=2, num_teacher_samples=2, num_drafts=2)
    config.grpo.group_size = 4
  return config


def prepare_models(workdir: str, config, models: str, quick: bool) -> tuple[str, str]:
  """(student dir, teacher dir): `models` if given, else built (once) by demo_models: the demo's
  trained pair, or with `quick` the smoke variant's untrained tiny pair (plumbing only)."""
  from omniopd_jax.experiments import demo_models

  if models:
    student, teacher = os.path.join(models, "student"), os.path.join(models, "teacher")
    for path in (student, teacher):
      if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--models={models}: {path} is not an HF model directory")
    return student, teacher
  if quick:
    config = config.copy_and_resolve_references()
    config.model.build_demo_models = "tiny"
  return demo_models.build(workdir, config, log=lambda m: print(m, flush=True))


def permuted_tokenizer_teacher(teacher_dir: str, out_dir: str) -> str:
  """The same teacher behind a different tokenizer: every non-special token gets another id
  (reversed order), and the embedding rows move with them, so the teacher's text behaviour is
  unchanged while its vocabulary no longer matches the student's token for token."""
  import numpy as np
  import safetensors.numpy
  import tokenizers
  import transformers

  from omniopd_jax.models import hf

  if os.path.exists(os.path.join(out_dir, "config.json")):
    return out_dir
  tok = hf.load_tokenizer(teacher_dir)
  spec = json.loads(tok.backend_tokenizer.to_str())
  vocab = spec["model"]["vocab"]  # token -> id
  special = {t for t in tok.all_special_tokens}
  movable = sorted((i for t, i in vocab.items() if t not in special))
  new_id = dict(zip(movable, reversed(movable)))  # old id -> new id
  spec["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
  backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
  new_tok = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token=tok.pad_token, bos_token=tok.bos_token,
    eos_token=tok.eos_token, unk_token=tok.unk_token,
  )  # fmt: skip
  new_tok.chat_template = tok.chat_template
  tensors = safetensors.numpy.load_file(os.path.join(teacher_dir, "model.safetensors"))
  order = np.arange(len(vocab))
  for old, new in new_id.items():
    order[new] = old  # row `new` of the new matrix is row `old` of the old one
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    if name in tensors:
      tensors[name] = np.ascontiguousarray(tensors[name][order])
  tmp = f"{out_dir}.tmp{os.getpid()}"  # parallel compare processes may race to make it
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  safetensors.numpy.save_file(tensors, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
  for name in ("config.json", "generation_config.json"):
    shutil.copy(os.path.join(teacher_dir, name), tmp)
  new_tok.save_pretrained(tmp)
  try:
    os.replace(tmp, out_dir)
  except OSError:  # another process got there first: same content
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# ----------------------------------------------------------------------------- runs


def parse_overrides(items) -> tuple:
  """["a.b=3", "c=centered"] -> (("a.b", 3), ("c", "centered")): Python literals, else strings."""
  out = []
  for item in items:
    field, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. omniopd.chunk_len=6")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    out.append((field.strip(), value))
  return tuple(out)


def run_config(base, variant: Variant, *, lr: float, seed: int, steps: int, student: str,
               teacher: str, teacher_url: str, extra: tuple = ()):  # fmt: skip
  """The config of one run: base + the variant's overrides, pointing at the shared models."""
  config = base.copy_and_resolve_references()
  config.unlock()
  config.model.build_demo_models = ""  # use the given model paths, build nothing
  config.method = variant.method
  config.seed = seed
  config.num_steps = steps
  config.eval_every = steps // 4  # 0 (short runs): only before and after
  config.checkpoint_every = steps  # one checkpoint, at the end
  config.keep_checkpoints = 1
  config.model.student_path = student
  config.opd.teacher_path = teacher
  config.teacher.base_url = teacher_url
  config.teacher.serve_local = False
  config.optimizer.learning_rate = lr
  config.optimizer.warmup_steps = max(steps // 10, 1)
  for field, value in (*extra, *variant.overrides):
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def teacher_tokens(run_dir: str, method: str, batch_size: int) -> float:
  """Tokens the teacher produced (OmniOPD: continuation tokens) or scored (OPD: the student's
  sampled tokens, one forward pass); SFT uses dataset solutions and GRPO no teacher: 0."""
  total = 0.0
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if method == "omniopd":
        total += row.get("teacher/tokens_out", 0.0)
      elif method == "opd":
        total += row.get("rollout/response_len", 0.0) * batch_size
  return total


def accuracy_curve(run_dir: str) -> list[tuple[int, float]]:
  path = os.path.join(run_dir, "eval.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  return sorted({int(r["step"]): float(r["eval/pass@1"]) for r in rows}.items())


def run_one(config, variant: Variant, run_dir: str) -> dict:
  """Trains one run (or reads its cached result); a refusal is a result, not a crash."""
  from omniopd_jax.train import loop as train

  done = os.path.join(run_dir, "result.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
  result = dict(variant=variant.name, group=variant.group, method=variant.method,
                lr=config.optimizer.learning_rate, seed=config.seed)  # fmt: skip
  t0 = time.time()
  try:
    final = train.run(config, run_dir)
  except ValueError as e:  # opd with a different-tokenizer teacher refuses; other errors raise
    if not variant.other_tokenizer:
      raise
    result.update(error=str(e), wall_s=time.time() - t0)
  else:
    result.update(
      before=final["eval_before"]["eval/pass@1"],
      after=final["eval_after"]["eval/pass@1"],
      curve=accuracy_curve(run_dir),
      wall_s=time.time() - t0,
      teacher_tokens=teacher_tokens(run_dir, variant.method, config.batch_size),
    )
  os.makedirs(run_dir, exist_ok=True)
  with open(done, "w") as f:
    json.dump(result, f)
  shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # keep the disk small
  return result


# ----------------------------------------------------------------------------- report


def summarize(results: list[dict]) -> list[dict]:
  """One row per (variant, lr): accuracy mean and std over seeds, wall time, teacher tokens."""
  import numpy as np

  rows: dict = {}
  for r in results:
    rows.setdefault((r["variant"], r["lr"]), []).append(r)
  out = []
  for (name, lr), rs in rows.items():
    ok = [r for r in rs if "error" not in r]
    row = dict(variant=name, group=rs[0]["group"], method=rs[0]["method"], lr=lr, seeds=len(rs))
    if not ok:
      row["error"] = rs[0]["error"]
    else:
      after = np.array([r["after"] for r in ok])
      row.update(
        before=float(np.mean([r["before"] for r in ok])),
        after_mean=float(after.mean()),
        after_std=float(after.std(ddof=1)) if len(after) > 1 else 0.0,
        wall_s=float(np.mean([r["wall_s"] for r in ok])),
        teacher_tokens=float(np.mean([r["teacher_tokens"] for r in ok])),
      )
    out.append(row)
  order = {v.name: i for i, v in enumerate(VARIANTS)}
  return sorted(out, key=lambda row: (order.get(row["variant"], len(order)), row["lr"]))


def write_markdown(rows: list[dict], path: str, header: str) -> None:
  lines = [header, "",
           "| variant | lr | seeds | before | after (mean +- std) | change | wall s/run | "
           "teacher tokens/run |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['variant']} | {r['lr']:g} | {r['seeds']} | - | refused: "
                   f"{r['error'][:90]}... | - | - | - |")  # fmt: skip
      continue
    lines.append(
      f"| {r['variant']} | {r['lr']:g} | {r['seeds']} | {r['before']:.3f} | "
      f"{r['after_mean']:.3f} +- {r['after_std']:.3f} | {r['after_mean'] - r['before']:+.3f} | "
      f"{r['wall_s']:.0f} | {r['teacher_tokens']:.0f} |"
    )
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(results: list[dict], rows: list[dict], path: str) -> None:
  """Held-out accuracy against step, mean over seeds at each variant's best learning rate."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  best: dict = {}  # variant -> its row with the most seeds (the best learning rate)
  for r in rows:
    key = lambda row: (row["seeds"], row["after_mean"])  # noqa: E731
    if "error" not in r and (r["variant"] not in best or key(r) > key(best[r["variant"]])):
      best[r["variant"]] = r
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
  for ax, groups, title in ((axes[0], ("method",), "methods (best lr)"),
                            (axes[1], ("ablation", "tokenizer", "style"), "ablations, other teachers")):  # fmt: skip
    for name, row in best.items():
      if row["group"] not in groups:
        continue
      curves = [r["curve"] for r in results
                if r["variant"] == name and r["lr"] == row["lr"] and "curve" in r]  # fmt: skip
      steps = sorted({s for c in curves for s, _ in c})
      mean = [np.mean([dict(c)[s] for c in curves if s in dict(c)]) for s in steps]
      style = "-" if row["method"] == "omniopd" else "--"
      ax.plot(steps, mean, style, marker="o", label=f"{name} (lr {row['lr']:g})")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("held-out greedy accuracy (pass@1)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def compare(
  workdir: str,
  *,
  quick=False,
  seeds=0,
  steps=0,
  models="",
  lrs=(),
  only=(),
  overrides=(),
  report_only=False,
  style_teacher="",
) -> list:
  """Runs the whole comparison; returns the summary rows (also written to results.md)."""
  import jax
  import torch

  from omniopd_jax.experiments import demo_models
  from omniopd_jax.teacher import server as serve

  os.makedirs(workdir, exist_ok=True)
  # The MiniLM scorer (torch) shares the cores with JAX; one thread avoids oversubscription, which
  # on a busy 2-core machine made scoring several times slower.
  torch.set_num_threads(1)
  extra = parse_overrides(overrides)
  # Runs of the same method share most compiled programs: cache them on disk across runs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  base = base_config(quick)
  seeds = seeds or (1 if quick else 3)
  steps = steps or (2 if quick else base.num_steps)
  variants = [v for v in VARIANTS if not only or v.name in only]
  if only and len(variants) != len(only):
    unknown = set(only) - {v.name for v in VARIANTS}
    raise ValueError(f"unknown --only names {sorted(unknown)}: choose from "
                     f"{[v.name for v in VARIANTS]}")  # fmt: skip
  student, teacher = prepare_models(workdir, base, models, quick)
  other = permuted_tokenizer_teacher(teacher, os.path.join(workdir, "models", "teacher_other_tok"))
  servers: dict = {}

  def teacher_for(v: Variant) -> str:
    nonlocal style_teacher
    if v.style_shift and not style_teacher:  # trained once, here, unless --style_teacher
      style_teacher = demo_models.style_shift_teacher(
        os.path.join(workdir, "models", "teacher_style_shift"), base, teacher,
        steps=4 * quick, examples=16 * quick, log=lambda m: print(m, flush=True),
      )  # fmt: skip
    return other if v.other_tokenizer else style_teacher if v.style_shift else teacher

  def url_for(path: str) -> str:
    if path not in servers:
      servers[path] = serve.start_subprocess(
        path, log_path=os.path.join(workdir, f"serve_{os.path.basename(path)}.log")
      )
    return servers[path].url

  results = []
  t_start = time.time()
  if report_only:  # e.g. after running disjoint --only sets in parallel processes
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "*", "*", "result.json"))):
      with open(path) as f:
        results.append(json.load(f))
    variants = []

  def run(v, lr, seed):
    path = teacher_for(v)
    url = url_for(path) if v.method == "omniopd" else ""
    config = run_config(base, v, lr=lr, seed=seed, steps=steps, student=student, teacher=path,
                        teacher_url=url, extra=extra)  # fmt: skip
    run_dir = os.path.join(workdir, "runs", v.name, f"lr{lr:g}", f"seed{seed}")
    print(f"{v.name} lr={lr:g} seed={seed} ({time.time() - t_start:.0f}s so far)", flush=True)
    r = run_one(config, v, run_dir)
    if "error" in r:
      print(f"  -> refused: {r['error']}", flush=True)
    else:
      print(f"  -> accuracy {r['before']:.3f} -> {r['after']:.3f} ({r['wall_s']:.0f}s)",
            flush=True)  # fmt: skip
    results.append(r)
    return r

  try:
    # Seed 0 at every learning rate of the grid, then the other seeds at the best one.
    for v in variants:
      grid = (lrs or METHOD_LRS[v.method]) if v.sweep else (v.lr or base.optimizer.learning_rate,)
      grid = grid[:1] if quick else grid
      first = [(run(v, lr, 0).get("after", -1.0), lr) for lr in grid]
      best = max(first)[1]
      if max(first)[0] < 0:  # refused (the different-tokenizer opd): nothing more to learn
        continue
      for seed in range(1, seeds):
        run(v, best, seed)
  finally:
    for handle in servers.values():
      handle.stop()
  rows = summarize(results)
  header = (
    f"# OmniOPD vs baselines on the demo task\n\n"
    f"Held-out greedy accuracy (pass@1) on {base.eval.num_examples} chain-sum problems; "
    f"{steps} steps of batch {base.batch_size} student samples; seed 0 at each learning rate "
    f"of the grid, then seeds 1..{seeds - 1} at the best one (the `seeds` column); "
    f"{sum(r.get('wall_s', 0.0) for r in results) / 60:.0f} min of runs in all.\n"
    f"Command: `python -m omniopd_jax.experiments.compare --workdir=DIR"
    f"{' --quick' if quick else ''} --seeds={seeds} --steps={steps}`"
  )
  write_markdown(rows, os.path.join(workdir, "results.md"), header)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"runs": results, "rows": rows}, f, indent=1)
  plot(results, rows, os.path.join(workdir, "accuracy.png"))
  print(open(os.path.join(workdir, "results.md")).read(), flush=True)
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from omniopd_jax.train import loop as train

  train.setup_logging()
  compare(
    FLAGS.workdir, quick=FLAGS.quick, seeds=FLAGS.seeds, steps=FLAGS.steps, models=FLAGS.models,
    lrs=tuple(float(x) for x in FLAGS.lrs.split(",") if x),
    only=tuple(x for x in FLAGS.only.split(",") if x), overrides=FLAGS.set,
    report_only=FLAGS.report_only, style_teacher=FLAGS.style_teacher,
  )  # fmt: skip


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
