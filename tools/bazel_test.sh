#!/usr/bin/env bash
# Runs the Bazel test targets of BUILD offline with Debian's bazel-bootstrap (Bazel 4.2.3).
#
#   tools/bazel_test.sh                      # every target: bazel test //...
#   tools/bazel_test.sh //:test_layers       # named targets
#   tools/bazel_test.sh --test_arg=-k --test_arg=ema //:test_layers   # flags pass through
#
# Installs bazel-bootstrap with apt-get when no `bazel` is on PATH. Needs the virtualenv that
# `make venv` builds (its interpreter is the Python toolchain, see WORKSPACE) and, for the
# ConvNeXt/ViT parity tests, the timm environment `make test` builds (.venv-timm).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  echo "tools/bazel_test.sh: no .venv/bin/python here: run \`make venv\` first" >&2
  exit 1
fi

if ! command -v bazel >/dev/null 2>&1; then
  echo "tools/bazel_test.sh: no bazel on PATH: installing Debian's bazel-bootstrap" >&2
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "tools/bazel_test.sh: installing bazel-bootstrap needs root: run 'apt-get install bazel-bootstrap' as root" >&2
      exit 1
    }
    sudo_cmd=(sudo)
  fi
  "${sudo_cmd[@]}" apt-get install -y bazel-bootstrap \
    || { "${sudo_cmd[@]}" apt-get update && "${sudo_cmd[@]}" apt-get install -y bazel-bootstrap; }
fi

args=("$@")
has_target=0
for arg in "${args[@]}"; do
  [[ $arg == //* || $arg == :* ]] && has_target=1
done
(( has_target )) || args+=("//...")

# The timm parity tests run timm in its own virtualenv (`make test` builds it; see
# tests/timm_requirements.txt); the sandbox does not see the repository's .venv-timm by path.
exec bazel test --test_env=TWINS_TF_TIMM_PYTHON="$PWD/.venv-timm/bin/python" "${args[@]}"
