"""SLURM scripts: syntax (bash -n), shellcheck (skipped when it is not installed), and the launch command they
build, run with stub srun/scontrol and a stub python standing in for torchrun."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
JOB_SCRIPTS = ["pretrain_ssa_7b.sh", "pretrain_ssa_1b.sh", "sweep_budgets.sh"]

STUB_SRUN = """#!/usr/bin/env bash
# Records the srun command, then runs the per-node command as node 0 would.
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
STUB_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-017\\ngpu-node-018\\n'; fi
"""
STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for the python that runs torchrun: records argv and the environment; with STUB_WAIT_FOR_STOP it
# behaves like training that checkpoints and exits when the stop file appears.
printf '%s\\n' "$@" > "$STUB_LOG/python.args"
env > "$STUB_LOG/python.env"
if [ -n "${STUB_WAIT_FOR_STOP:-}" ]; then
  touch "$STUB_LOG/started"
  for _ in $(seq 600); do [ -e "$RUN_DIR/STOP" ] && exit 0; sleep 0.1; done
  exit 3
fi
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *[str(s.relative_to(ROOT)) for s in SCRIPTS]], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_sbatch_header(name):
    text = (ROOT / "slurm" / name).read_text()
    for directive in ("--nodes=", "--gpus-per-node=8", "--ntasks-per-node=1", "--exclusive", "--time=",
                      "--output=", "--requeue", "--signal=B:USR1@"):
        assert f"#SBATCH {directive}" in text, (name, directive)
    assert os.access(ROOT / "slurm" / name, os.X_OK)


def _stub_env(tmp_path, **extra):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("python", STUB_PYTHON)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SSA_", "RUN_DIR", "MASTER_", "TRITON_CACHE", "TORCHINDUCTOR_CACHE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log), SSA_ROOT=str(ROOT),
               SSA_PYTHON=str(bin_dir / "python"), RUN_DIR=str(tmp_path / "run"), SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="ssa_7b", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[017-018]",
               SLURM_SUBMIT_DIR=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    env.update(extra)
    return env, log


def _lines(path):
    return path.read_text().splitlines()


@pytest.mark.slow
def test_7b_launch_command(tmp_path):
    env, log = _stub_env(tmp_path)
    result = subprocess.run(["bash", str(ROOT / "slurm/pretrain_ssa_7b.sh"), "train.steps=10"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _lines(log / "srun.args")
    assert srun[0] == "--nodes=2" and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert not any(a.startswith("--container") for a in srun)
    assert f"--output={tmp_path}/run/logs/%x-%j-node%n.log" in srun
    assert srun[srun.index(str(ROOT / "slurm/node_launch.sh")) + 1:] == [
        "ssa_7b", f"train.run_dir={tmp_path}/run", "train.steps=10"]
    python = _lines(log / "python.args")
    assert python == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-node-017:29500", "--rdzv_id=4242", "--max_restarts=0",
        "-m", "ssa_megatron.training.cli", "ssa_7b", f"train.run_dir={tmp_path}/run", "train.steps=10"]
    environ = dict(line.split("=", 1) for line in _lines(log / "python.env") if "=" in line)
    assert environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert environ["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert environ["NCCL_NVLS_ENABLE"] == "0"  # NVLink SHARP off unless the user turns it on
    assert environ["SSA_MEGATRON_CACHE"].startswith("/tmp/ssa_megatron_compile_")  # node-local, outlives the job
    assert "TRITON_CACHE_DIR" not in environ  # ssa-train derives it from SSA_MEGATRON_CACHE
    assert environ["MASTER_ADDR"] == "gpu-node-017"
    assert "scontrol show hostnames gpu-node-[017-018]" in (log / "scontrol.log").read_text()
    assert (tmp_path / "run" / "logs").is_dir()
    assert "requeue" not in (log / "scontrol.log").read_text()


@pytest.mark.slow
def test_container_and_1b_baseline(tmp_path):
    env, log = _stub_env(tmp_path, SSA_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.11-py3",
                         SSA_CONTAINER_MOUNTS="/lustre/data:/data", RECIPE="full_attn", SLURM_JOB_NAME="full_attn",
                         NCCL_NVLS_ENABLE="1")
    result = subprocess.run(["bash", str(ROOT / "slurm/pretrain_ssa_1b.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _lines(log / "srun.args")
    assert "--container-image=nvcr.io#nvidia/pytorch:25.11-py3" in srun
    assert f"--container-mounts={ROOT}:{ROOT},{tmp_path}/run:{tmp_path}/run,/lustre/data:/data" in srun
    assert f"--container-workdir={ROOT}" in srun
    assert _lines(log / "python.args")[-2:] == ["full_attn", f"train.run_dir={tmp_path}/run"]
    environ = dict(line.split("=", 1) for line in _lines(log / "python.env") if "=" in line)
    assert environ["NCCL_NVLS_ENABLE"] == "1"  # the user's setting is kept


@pytest.mark.slow
def test_budget_sweep_array_task(tmp_path):
    env, log = _stub_env(tmp_path, SLURM_ARRAY_TASK_ID="3", SLURM_JOB_NAME="ssa_budget_sweep", RUN_DIR="")
    del env["RUN_DIR"]
    env["SSA_ROOT"] = str(ROOT)
    result = subprocess.run(["bash", str(ROOT / "slurm/sweep_budgets.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    python = _lines(log / "python.args")
    assert python[-3:] == ["125m", f"train.run_dir={ROOT}/runs/sweep_125m_k32", "ssa.top_k=32"]
    assert "--rdzv_endpoint=gpu-node-017:29503" in python
    shutil.rmtree(ROOT / "runs" / "sweep_125m_k32", ignore_errors=True)


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_requeues(tmp_path):
    env, log = _stub_env(tmp_path, STUB_WAIT_FOR_STOP="1")
    proc = subprocess.Popen(["bash", str(ROOT / "slurm/pretrain_ssa_7b.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@600 does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "scontrol requeue 4242" in (log / "scontrol.log").read_text(), out
    assert not (tmp_path / "run" / "STOP").exists()
    assert "requeueing job 4242" in out
