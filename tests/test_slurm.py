"""SLURM scripts: syntax (bash -n), shellcheck (skipped when it is not installed), and the launch command they
build, run with stub sbatch/srun/scontrol and a stub python standing in for torchrun. The stub srun writes the
per-node log as srun would (--output with %x/%j/%n, --open-mode), so requeues can be checked for appending.
One test runs real tiny trainings through the sweep script (torchrun on CPU) to check that a run folder refuses
a resume with another budget."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
CLUSTER_ENV = ROOT / "slurm" / "cluster.env"
JOB_SCRIPTS = ["pretrain_ssa_7b.sh", "pretrain_ssa_1b.sh", "sweep_budgets.sh"]

STUB_SRUN = """#!/usr/bin/env bash
# Records the srun command, then runs the per-node command as node 0 would: stdout and stderr to --output
# (%x job name, %j job id, %n node 0), appended with --open-mode=append, truncated otherwise (srun's default
# on a cluster whose JobFileAppend is 0); --cpus-per-task reaches the task as SLURM_CPUS_PER_TASK.
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
out="" mode=truncate
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  case $1 in
    --output=*) out=${1#--output=} ;;
    --open-mode=*) mode=${1#--open-mode=} ;;
    --cpus-per-task=*) export SLURM_CPUS_PER_TASK=${1#--cpus-per-task=} ;;
  esac
  shift
done
export SLURM_NODEID=0
if [ -n "$out" ]; then
  out=${out//"%x"/$SLURM_JOB_NAME}; out=${out//"%j"/$SLURM_JOB_ID}; out=${out//"%n"/0}
  if [ "$mode" = append ]; then exec "$@" >> "$out" 2>&1; else exec "$@" > "$out" 2>&1; fi
fi
exec "$@"
"""
STUB_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' ${STUB_HOSTS:-gpu-node-017 gpu-node-018}; fi
"""
STUB_SBATCH = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG/sbatch.args"
env > "$STUB_LOG/sbatch.env"
pwd > "$STUB_LOG/sbatch.pwd"
echo "Submitted batch job 4242"
"""
STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for the python that runs torchrun: answers the import check (-c), records argv and the environment,
# prints a line to the node log; with STUB_WAIT_FOR_STOP it behaves like training that checkpoints and exits
# when the stop file appears.
if [ "$1" = -c ]; then echo "preflight" >> "$STUB_LOG/python.preflight"; exit 0; fi
printf '%s\\n' "$@" > "$STUB_LOG/python.args"
env > "$STUB_LOG/python.env"
echo "stub training: launch with restart count ${SLURM_RESTART_COUNT:-0}"
if [ -n "${STUB_WAIT_FOR_STOP:-}" ]; then
  touch "$STUB_LOG/started"
  for _ in $(seq 600); do
    if [ -e "$RUN_DIR/STOP" ]; then
      mkdir -p "$RUN_DIR/checkpoints" && echo step_00000042 > "$RUN_DIR/checkpoints/latest"
      echo "stub training: checkpoint step_00000042, stopping"
      exit 0
    fi
    sleep 0.1
  done
  exit 3
fi
"""


def _all_scripts():
    return [*SCRIPTS, CLUSTER_ENV]


@pytest.mark.parametrize("script", _all_scripts(), ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *[str(s.relative_to(ROOT)) for s in _all_scripts()]], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_sbatch_header(name):
    text = (ROOT / "slurm" / name).read_text()
    for directive in ("--nodes=", "--gpus-per-node=8", "--ntasks-per-node=1", "--exclusive", "--time=",
                      "--output=", "--open-mode=append", "--requeue", "--signal=B:USR1@"):
        assert f"#SBATCH {directive}" in text, (name, directive)
    # The CPU count is the node's (--exclusive, read at run time), never a fixed number.
    assert "--cpus-per-task" not in "".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
    # #SBATCH lines cannot read variables: account and partition come from sbatch options (submit.sh).
    assert "--account" not in text.split("\n#\n")[0] and "--partition" not in text.split("\n#\n")[0]
    assert os.access(ROOT / "slurm" / name, os.X_OK)


def _load_cluster_env(cluster_env, keys, **environ):
    """The values of ``keys`` after common.sh's loader read ``cluster_env`` in a clean environment + ``environ``."""
    show = (f"source {ROOT}/slurm/common.sh; SSA_ROOT={ROOT} SSA_CLUSTER_ENV={cluster_env} ssa_load_cluster_env; "
            + "; ".join(f'echo "{k}=${{{k}-<unset>}}"' for k in keys) + "; env")
    out = subprocess.run(["bash", "-c", show], env={"PATH": os.environ["PATH"], **environ}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return dict(line.split("=", 1) for line in out[:len(keys)]), out[len(keys):]


def test_cluster_env_is_the_one_block(tmp_path):
    """Every setting a user must know is in cluster.env; the shipped file sets nothing cluster-specific; a
    variable set in the environment (even empty) wins over the file; values with braces and spaces survive; all
    of it is exported to the job."""
    keys = ["SSA_ACCOUNT", "SSA_PARTITION", "SSA_NODES", "SSA_TIME", "SSA_SBATCH_ARGS", "SSA_DATA", "SSA_TOKENIZER",
            "SSA_CONTAINER_IMAGE", "SSA_CONTAINER_MOUNTS", "RUN_DIR", "GPUS_PER_NODE"]
    values, _ = _load_cluster_env(CLUSTER_ENV, keys)
    assert values == {**{k: "" for k in keys}, "GPUS_PER_NODE": "8"}
    edited = tmp_path / "cluster.env"
    edited.write_text("SSA_NODES=2\nSSA_DATA='/lustre/c/train-{000000..000099}.tar'\n"
                      "SSA_SBATCH_ARGS=\"--qos=high --constraint=h100\"\nGPUS_PER_NODE=8\nNCCL_IB_HCA=mlx5\n")
    values, environ = _load_cluster_env(edited, ["SSA_NODES", "SSA_DATA", "SSA_SBATCH_ARGS", "GPUS_PER_NODE",
                                                 "NCCL_IB_HCA"], SSA_NODES="4", GPUS_PER_NODE="")
    assert values == {"SSA_NODES": "4", "SSA_DATA": "/lustre/c/train-{000000..000099}.tar",
                      "SSA_SBATCH_ARGS": "--qos=high --constraint=h100", "GPUS_PER_NODE": "", "NCCL_IB_HCA": "mlx5"}
    assert "NCCL_IB_HCA=mlx5" in environ and "SSA_DATA=/lustre/c/train-{000000..000099}.tar" in environ


def _stub_env(tmp_path, cluster: str = "", **extra):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("python", STUB_PYTHON),
                       ("sbatch", STUB_SBATCH)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    # A cluster.env of the test's own: the tests do not depend on what a user wrote into slurm/cluster.env.
    (tmp_path / "cluster.env").write_text(cluster)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SSA_", "SBATCH_", "RUN_DIR", "MASTER_", "GPUS_PER_NODE", "OMP_NUM_THREADS",
                                "BUDGETS", "BLOCK_SIZE", "RECIPE", "SWEEP_NAME", "TRITON_CACHE",
                                "TORCHINDUCTOR_CACHE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log), SSA_ROOT=str(ROOT),
               SSA_CLUSTER_ENV=str(tmp_path / "cluster.env"),
               SSA_PYTHON=str(bin_dir / "python"), RUN_DIR=str(tmp_path / "run"), SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="ssa_7b", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[017-018]",
               SLURM_JOB_CPUS_PER_NODE="96(x2)", SLURM_SUBMIT_DIR=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    env.update(extra)
    return env, log


def _lines(path):
    return path.read_text().splitlines()


def _environ(log):
    return dict(line.split("=", 1) for line in _lines(log / "python.env") if "=" in line)


def _run(script, env, *args, timeout=60):
    return subprocess.run(["bash", str(ROOT / "slurm" / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_7b_launch_command(tmp_path):
    env, log = _stub_env(tmp_path)
    result = _run("pretrain_ssa_7b.sh", env, "train.steps=10")
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _lines(log / "srun.args")
    assert srun[0] == "--nodes=2" and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert "--open-mode=append" in srun  # a requeue adds to the per-node logs
    assert "--cpus-per-task=96" in srun  # the node's CPUs (SLURM_JOB_CPUS_PER_NODE), for torchrun and its ranks
    assert not any(a.startswith("--container") for a in srun)
    assert f"--output={tmp_path}/run/logs/%x-%j-node%n.log" in srun
    assert srun[srun.index(str(ROOT / "slurm/node_launch.sh")) + 1:] == [
        "ssa_7b", f"train.run_dir={tmp_path}/run", "train.steps=10"]
    python = _lines(log / "python.args")
    assert python == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-node-017:29500", "--rdzv_id=4242", "--max_restarts=0",
        "-m", "ssa_megatron.training.cli", "ssa_7b", f"train.run_dir={tmp_path}/run", "train.steps=10"]
    environ = _environ(log)
    assert environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert environ["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert environ["NCCL_NVLS_ENABLE"] == "0"  # NVLink SHARP off unless the user turns it on
    assert environ["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 ranks
    assert environ["SSA_MEGATRON_CACHE"].startswith("/tmp/ssa_megatron_compile_")  # node-local, outlives the job
    assert "TRITON_CACHE_DIR" not in environ  # ssa-train derives it from SSA_MEGATRON_CACHE
    assert environ["MASTER_ADDR"] == "gpu-node-017"
    # The checkout's code is imported, on bare metal as in a container.
    assert environ["PYTHONPATH"].split(":")[:2] == [str(ROOT), str(ROOT / "kernels")]
    assert (log / "python.preflight").exists()  # the import check ran before torchrun
    assert "scontrol show hostnames gpu-node-[017-018]" in (log / "scontrol.log").read_text()
    node_log = (tmp_path / "run/logs/ssa_7b-4242-node0.log").read_text()
    assert "node 0" in node_log and "stub training: launch with restart count 0" in node_log
    assert "96 CPUs per node" in result.stdout and "bare metal" in result.stdout
    assert "requeue" not in (log / "scontrol.log").read_text()


@pytest.mark.slow
def test_variables_reach_their_places(tmp_path):
    """cluster.env's values reach the recipe overrides, torchrun and srun; the environment wins over the file;
    arguments win over both."""
    cluster = ("SSA_DATA='/lustre/corpus/train-{000000..000099}.tar'\nSSA_TOKENIZER=/lustre/tok/tokenizer.json\n"
               f"RUN_DIR={tmp_path}/from_file\nGPUS_PER_NODE=4\n")
    env, log = _stub_env(tmp_path, cluster, SSA_EXTRA_OVERRIDES="train.log_interval=5")
    del env["RUN_DIR"]
    result = _run("pretrain_ssa_1b.sh", env, "train.steps=10")
    assert result.returncode == 0, result.stdout + result.stderr
    python = _lines(log / "python.args")
    assert "--nproc_per_node=4" in python
    assert python[python.index("ssa_megatron.training.cli") + 1:] == [
        "ssa_1b", f"train.run_dir={tmp_path}/from_file", "data.train_shards=/lustre/corpus/train-{000000..000099}.tar",
        "data.tokenizer=/lustre/tok/tokenizer.json", "train.log_interval=5", "train.steps=10"]
    assert f"--output={tmp_path}/from_file/logs/%x-%j-node%n.log" in _lines(log / "srun.args")
    assert _environ(log)["OMP_NUM_THREADS"] == "24"  # 96 CPUs / 4 ranks

    # The environment wins over the file, an empty value too (no data override: the recipe's value).
    env.update(RUN_DIR=str(tmp_path / "from_env"), SSA_DATA="", OMP_NUM_THREADS="3")
    result = _run("pretrain_ssa_1b.sh", env)
    assert result.returncode == 0, result.stdout + result.stderr
    python = _lines(log / "python.args")
    assert python[python.index("ssa_megatron.training.cli") + 1:] == [
        "ssa_1b", f"train.run_dir={tmp_path}/from_env", "data.tokenizer=/lustre/tok/tokenizer.json",
        "train.log_interval=5"]
    assert _environ(log)["OMP_NUM_THREADS"] == "3"  # the user's value is kept

    # A train.run_dir argument is the run directory: logs and the stop file go where training writes; relative
    # paths are the checkout's.
    del env["SSA_DATA"]
    result = _run("pretrain_ssa_1b.sh", env, f"train.run_dir={tmp_path}/from_arg", "data.train_shards=/x")
    assert result.returncode == 0, result.stdout + result.stderr
    python = _lines(log / "python.args")
    assert [a for a in python if a.startswith("train.run_dir=")] == [f"train.run_dir={tmp_path}/from_arg"]
    shards = [a for a in python if a.startswith("data.train_shards=")]
    assert shards[-1] == "data.train_shards=/x" and len(shards) == 2  # after the cluster's value: it wins
    assert f"--output={tmp_path}/from_arg/logs/%x-%j-node%n.log" in _lines(log / "srun.args")
    assert (tmp_path / "from_arg/logs").is_dir()


@pytest.mark.slow
def test_cpu_count_from_the_allocation(tmp_path):
    # Nodes of different sizes: the smallest count fits every node.
    env, log = _stub_env(tmp_path, SLURM_JOB_CPUS_PER_NODE="112(x1),64")
    assert _run("pretrain_ssa_7b.sh", env).returncode == 0
    assert "--cpus-per-task=64" in _lines(log / "srun.args") and _environ(log)["OMP_NUM_THREADS"] == "8"
    # Without SLURM_JOB_CPUS_PER_NODE: the batch node's SLURM_CPUS_ON_NODE; never less than one thread.
    del env["SLURM_JOB_CPUS_PER_NODE"]
    env.update(SLURM_CPUS_ON_NODE="4")
    assert _run("pretrain_ssa_7b.sh", env).returncode == 0
    assert "--cpus-per-task=4" in _lines(log / "srun.args") and _environ(log)["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_container_and_1b_baseline(tmp_path):
    data = tmp_path / "lustre" / "corpus"
    data.mkdir(parents=True)
    env, log = _stub_env(tmp_path, SSA_CONTAINER_IMAGE="/images/ssa-megatron.sqsh",
                         SSA_CONTAINER_MOUNTS="/scratch:/scratch", RECIPE="full_attn", SLURM_JOB_NAME="full_attn",
                         SSA_DATA=str(data), SSA_TOKENIZER="/lustre/tok/tokenizer.json", NCCL_NVLS_ENABLE="1")
    del env["SSA_PYTHON"]  # in a container: the image's python
    result = _run("pretrain_ssa_1b.sh", env)
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _lines(log / "srun.args")
    assert "--container-image=/images/ssa-megatron.sqsh" in srun
    # The checkout, the run directory, the data folder, the tokenizer's folder, then the user's mounts.
    run = tmp_path / "run"
    assert (f"--container-mounts={ROOT}:{ROOT},{run}:{run},{data}:{data},/lustre/tok:/lustre/tok,/scratch:/scratch"
            in srun)
    assert f"--container-workdir={ROOT}" in srun
    assert srun.index("--container-image=/images/ssa-megatron.sqsh") < srun.index(str(ROOT / "slurm/node_launch.sh"))
    python = _lines(log / "python.args")
    assert python[-4:] == ["full_attn", f"train.run_dir={run}", f"data.train_shards={data}",
                           "data.tokenizer=/lustre/tok/tokenizer.json"]
    environ = _environ(log)
    assert environ["SSA_PYTHON"] == "python"  # the container's, found on PATH (the stub here)
    assert environ["PYTHONPATH"].split(":")[:2] == [str(ROOT), str(ROOT / "kernels")]  # ssa_kernels importable
    assert environ["NCCL_NVLS_ENABLE"] == "1"  # the user's setting is kept
    assert "container /images/ssa-megatron.sqsh" in result.stdout


def test_import_check_names_what_the_python_lacks(tmp_path):
    """A container image without the dependencies stops on every node with one line naming them and the fix."""
    bare = tmp_path / "python"
    bare.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -S \"$@\"\n")  # no site-packages: a bare image
    bare.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "SLURM_NNODES": "1", "SLURM_JOB_ID": "1", "MASTER_ADDR": "x",
           "MASTER_PORT": "1", "SSA_PYTHON": str(bare), "GPUS_PER_NODE": "1", "SSA_ROOT": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "slurm/node_launch.sh"), "tiny"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "megatron.core" in result.stderr and "torch" in result.stderr and "Dockerfile" in result.stderr


@pytest.mark.slow
def test_requeue_appends_logs_and_resumes_in_the_same_run_dir(tmp_path):
    env, log = _stub_env(tmp_path, STUB_WAIT_FOR_STOP="1")
    batch_out = tmp_path / "ssa_7b-4242.out"  # what #SBATCH --output=%x-%j.out with --open-mode=append writes
    with batch_out.open("a") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "slurm/pretrain_ssa_7b.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 30
        while not (log / "started").exists():
            assert proc.poll() is None and time.time() < deadline, batch_out.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@600 does
        assert proc.wait(timeout=60) == 0, batch_out.read_text()
    assert "scontrol requeue 4242" in (log / "scontrol.log").read_text()
    assert not (tmp_path / "run" / "STOP").exists()
    first_args = _lines(log / "python.args")

    # The requeued job: same id and environment, SLURM_RESTART_COUNT 1, a training that runs to its end.
    env.update(SLURM_RESTART_COUNT="1")
    del env["STUB_WAIT_FOR_STOP"]
    with batch_out.open("a") as out:
        assert subprocess.run(["bash", str(ROOT / "slurm/pretrain_ssa_7b.sh")], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=60).returncode == 0
    assert _lines(log / "python.args") == first_args  # the same command: same run dir, so ssa-train resumes
    batch = batch_out.read_text()
    assert "requeueing job 4242; the next run resumes from step_00000042" in batch
    assert "(restart 0)" in batch and "(restart 1)" in batch
    node_log = (tmp_path / "run/logs/ssa_7b-4242-node0.log").read_text()
    # Both launches in one file, in order: the requeue appended.
    first = node_log.index("stub training: launch with restart count 0")
    assert node_log.index("stub training: checkpoint step_00000042, stopping") > first
    assert node_log.index("stub training: launch with restart count 1") > first
    assert node_log.count("of job 4242, restart") == 2
    assert "scontrol requeue" not in (log / "scontrol.log").read_text().split("requeue 4242", 1)[1]


@pytest.mark.slow
def test_submit_passes_the_scheduler_settings(tmp_path):
    cluster = ('SSA_ACCOUNT=proj42\nSSA_PARTITION=gpu\nSSA_NODES=2\nSSA_TIME=08:00:00\n'
               'SSA_SBATCH_ARGS="--qos=high --constraint=h100"\nSSA_DATA=/lustre/corpus\n')
    env, log = _stub_env(tmp_path, cluster)
    for key in ("RUN_DIR", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_JOB_NODELIST"):
        del env[key]
    result = subprocess.run([str(ROOT / "slurm/submit.sh"), "--job-name=full_attn", "pretrain_ssa_1b.sh",
                             "train.steps=10"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _lines(log / "sbatch.args") == [
        "--account=proj42", "--partition=gpu", "--nodes=2", "--time=08:00:00", "--qos=high", "--constraint=h100",
        "--job-name=full_attn", str(ROOT / "slurm/pretrain_ssa_1b.sh"), "train.steps=10"]
    assert _lines(log / "sbatch.pwd") == [str(ROOT)]  # the job finds slurm/common.sh through SLURM_SUBMIT_DIR
    submitted = dict(line.split("=", 1) for line in _lines(log / "sbatch.env") if "=" in line)
    assert submitted["SSA_DATA"] == "/lustre/corpus"  # exported with the job: a requeue keeps the submitted value
    assert "submit: sbatch --account=proj42" in result.stdout

    # Nothing set: plain sbatch with the script's #SBATCH lines; the sweep's array follows BUDGETS.
    env["SSA_CLUSTER_ENV"] = str(CLUSTER_ENV)
    env["BUDGETS"] = "8 16 32"
    for key in ("SSA_ACCOUNT", "SSA_PARTITION", "SSA_NODES", "SSA_TIME", "SSA_SBATCH_ARGS", "SSA_DATA"):
        env[key] = ""  # whatever a user wrote into slurm/cluster.env
    result = subprocess.run([str(ROOT / "slurm/submit.sh"), "sweep_budgets.sh"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _lines(log / "sbatch.args") == ["--array=0-2", str(ROOT / "slurm/sweep_budgets.sh")]
    result = subprocess.run([str(ROOT / "slurm/submit.sh"), "nope.sh"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "no such job script" in result.stderr


@pytest.mark.slow
def test_budget_sweep_gives_each_budget_its_folder(tmp_path):
    env, log = _stub_env(tmp_path, SLURM_JOB_NAME="ssa_budget_sweep", SLURM_NNODES="1", BUDGETS="8 16 32")
    env["RUN_DIR"] = str(tmp_path / "study")  # the parent of the runs, not one run's folder
    folders = []
    for task, top_k in enumerate((8, 16, 32)):
        env["SLURM_ARRAY_TASK_ID"] = str(task)
        result = _run("sweep_budgets.sh", env, "train.steps=10")
        assert result.returncode == 0, result.stdout + result.stderr
        python = _lines(log / "python.args")
        folder = tmp_path / "study" / f"sweep_125m_k{top_k}_bs16"
        assert python[python.index("ssa_megatron.training.cli") + 1:] == [
            "125m", f"train.run_dir={folder}", f"ssa.top_k={top_k}", "ssa.block_size=16", "train.steps=10"]
        assert f"--rdzv_endpoint=gpu-node-017:{29500 + task}" in python
        assert (folder / "logs").is_dir()
        folders.append(folder)
    assert len(set(folders)) == 3

    # Without RUN_DIR: runs/ in the checkout; SWEEP_NAME and BLOCK_SIZE name the folder.
    del env["RUN_DIR"]
    env.update(SLURM_ARRAY_TASK_ID="1", SWEEP_NAME="study_a", BLOCK_SIZE="32", RECIPE="recipes/tiny.yaml")
    try:
        result = _run("sweep_budgets.sh", env)
        assert result.returncode == 0, result.stdout + result.stderr
        python = _lines(log / "python.args")
        assert python[-4:] == ["recipes/tiny.yaml", f"train.run_dir={ROOT}/runs/study_a_k16_bs32", "ssa.top_k=16",
                               "ssa.block_size=32"]
    finally:
        shutil.rmtree(ROOT / "runs" / "study_a_k16_bs32", ignore_errors=True)

    # A budget or folder given as an override would make the folder's name lie: refused.
    for bad in ("ssa.top_k=4", "ssa.block_size=64", "train.run_dir=/elsewhere"):
        result = _run("sweep_budgets.sh", env, bad)
        assert result.returncode == 1 and f"{bad}: a sweep sets the budget" in result.stderr
    env["SLURM_ARRAY_TASK_ID"] = "3"
    result = _run("sweep_budgets.sh", env)
    assert result.returncode == 1 and "submit with --array=0-2" in result.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sweep_run_refuses_a_resume_with_another_budget(tmp_path):
    """Real tiny trainings (torchrun, one CPU process) through sweep_budgets.sh: a task trains in its own folder;
    a folder reused for another budget (here: renamed) is refused by ssa-train's resume check, for top_k and for
    block_size, and nothing is trained."""
    env, log = _stub_env(tmp_path, SLURM_JOB_NAME="sweep", SLURM_NNODES="1", STUB_HOSTS="127.0.0.1",
                         SSA_PYTHON=sys.executable, GPUS_PER_NODE="1", RECIPE="tiny", BUDGETS="4 8",
                         MASTER_PORT=str(_free_port()), SSA_MEGATRON_CACHE=str(tmp_path / "cache"),
                         RUN_DIR=str(tmp_path / "study"))
    overrides = ["train.steps=2", "train.log_interval=1", "train.eval_interval=0"]
    env["SLURM_ARRAY_TASK_ID"] = "0"
    result = _run("sweep_budgets.sh", env, *overrides, timeout=600)
    k4 = tmp_path / "study" / "sweep_tiny_k4_bs16"
    node_log = k4 / "logs" / "sweep-4242-node0.log"
    assert result.returncode == 0, result.stdout + result.stderr + node_log.read_text()
    assert (k4 / "checkpoints" / "latest").exists()
    recorded = yaml.safe_load((k4 / "recipe.yaml").read_text())
    assert recorded["ssa"]["top_k"] == 4 and recorded["ssa"]["block_size"] == 16
    assert recorded["train"]["run_dir"] == str(k4)

    for task, block_size, folder, change in ((1, 16, "sweep_tiny_k8_bs16", "ssa.top_k 4 -> 8"),
                                             (0, 32, "sweep_tiny_k4_bs32", "ssa.block_size 16 -> 32")):
        moved = tmp_path / "study" / folder
        shutil.move(next((tmp_path / "study").iterdir()), moved)
        env.update(SLURM_ARRAY_TASK_ID=str(task), BLOCK_SIZE=str(block_size), MASTER_PORT=str(_free_port()))
        result = _run("sweep_budgets.sh", env, *overrides, timeout=600)
        text = (moved / "logs" / "sweep-4242-node0.log").read_text()
        assert result.returncode != 0, text
        assert "was trained with other settings" in text and change in text, text
        assert "training exited with status" in result.stdout
        assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["latest", "step_00000002"]


def test_docker_requirements_pin_what_pyproject_asks():
    """docker/requirements.txt pins (==) every runtime dependency of pyproject.toml except the ones the NGC
    PyTorch image provides and the Dockerfile checks (torch, triton, numpy), each pin inside pyproject's range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    pins = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", line
            pins[req.name.lower()] = spec[0].version
    from_image = {"torch", "triton", "numpy"}
    assert set(wanted) - from_image <= set(pins), set(wanted) - from_image - set(pins)
    assert not from_image & set(pins)
    for name, req in wanted.items():
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
    assert pins["megatron-core"] == "0.19.2"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in dockerfile and "nvcr.io/nvidia/pytorch:" in dockerfile
