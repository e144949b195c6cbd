#!/usr/bin/env bash
# Installs ssa_megatron into an NGC PyTorch image (called by docker/Dockerfile):
#   install.sh deps      check the image's python, torch, triton and numpy against pyproject.toml, then install
#                        docker/requirements.txt (the pins)
#   install.sh package   pip install --no-deps -e the checkout copied to /opt/ssa_megatron, then import it
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pip=(python -m pip install --no-cache-dir --disable-pip-version-check)

case ${1:-} in
deps)
  python - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.version import Version

problems = []
if sys.version_info < (3, 12):
    problems.append(f"python {sys.version.split()[0]} (megatron-core 0.19.2 needs >= 3.12)")
# NGC builds are pre-releases of the next version (2.11.0a0+...): compare the release numbers.
for name, low in (("torch", "2.11"), ("triton", "3.6")):
    try:
        have = Version(version(name))
    except PackageNotFoundError:
        problems.append(f"{name} is not installed")
        continue
    if have.release[:2] < Version(low).release[:2]:
        problems.append(f"{name} {have} (pyproject.toml asks >= {low})")
try:
    if Version(version("numpy")) >= Version("2.4"):
        problems.append(f"numpy {version('numpy')} (triton's interpreter breaks on >= 2.4)")
except PackageNotFoundError:
    pass  # installed with megatron-core below
if problems:
    sys.exit("docker/install.sh: the base image does not fit: " + "; ".join(problems)
             + ". Build on another: docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 ...")
print("docker/install.sh: base image fits: python %d.%d, torch %s, triton %s"
      % (*sys.version_info[:2], version("torch"), version("triton")))
PY
  # NGC images pin every installed package in a pip constraint file (/etc/pip/constraint.txt since 25.03).
  # Drop the lines of the packages pinned here, so pip may install the tested version; torch, triton, numpy and
  # everything else keep the image's constraint, so nothing installed here replaces them.
  constraint=${PIP_CONSTRAINT:-/etc/pip/constraint.txt}
  if [ -f "$constraint" ]; then
    python - "$constraint" "$here/requirements.txt" <<'PY'
import re
import sys

def name(line):
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[@]", line.strip(), maxsplit=1)[0]).lower()

constraint, requirements = sys.argv[1:]
pinned = {name(line) for line in open(requirements) if line.split("#", 1)[0].strip()}
lines = open(constraint).read().splitlines()
kept = [line for line in lines if not line.split("#", 1)[0].strip() or name(line) not in pinned]
open(constraint, "w").write("\n".join(kept) + "\n")
print(f"docker/install.sh: {constraint}: {len(lines) - len(kept)} constraints lifted for docker/requirements.txt")
PY
  fi
  "${pip[@]}" -r "$here/requirements.txt"
  ;;
package)
  "${pip[@]}" --no-deps -e "$here/.."
  python -c 'import megatron.core, webdataset, ssa_kernels, ssa_megatron.training.cli; print("docker/install.sh: ssa_megatron imports")'
  ;;
*)
  echo "usage: docker/install.sh deps|package" >&2
  exit 2
  ;;
esac
