# shellcheck shell=bash
# Source this file (after setup.sh has run once) to get the paths of the interop venv:
#
#   source tests/interop/env.sh
#   "$INTEROP_PYTHON" "$INTEROP_MANAGE" emit --destination /topic/interop.py --count 3
#
# Every variable can be overridden from the environment before sourcing.
_interop_env_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

export INTEROP_DIR="${INTEROP_DIR:-$_interop_env_dir}"
export INTEROP_REPO_ROOT="${INTEROP_REPO_ROOT:-$(cd "$INTEROP_DIR/../.." && pwd)}"
export INTEROP_VENV="${INTEROP_VENV:-$INTEROP_REPO_ROOT/target/interop-venv}"
export INTEROP_PYTHON="${INTEROP_PYTHON:-$INTEROP_VENV/bin/python}"
export INTEROP_PROJECT="${INTEROP_PROJECT:-$INTEROP_DIR/dop_project}"
export INTEROP_MANAGE="${INTEROP_MANAGE:-$INTEROP_PROJECT/manage.py}"

# Read by dop_project/settings.py (defaults shown).
export DOP_DATABASE_NAME="${DOP_DATABASE_NAME:-dop_interop}"
export DOP_DATABASE_HOST="${DOP_DATABASE_HOST:-127.0.0.1}"
export DOP_DATABASE_PORT="${DOP_DATABASE_PORT:-5432}"
export DOP_DATABASE_USER="${DOP_DATABASE_USER:-postgres}"
export DOP_STOMP_HOST="${DOP_STOMP_HOST:-127.0.0.1}"
export DOP_STOMP_PORT="${DOP_STOMP_PORT:-61613}"

# rabbitmqctl / rabbitmq-plugins live in /usr/sbin, which a non-login PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin:/sbin" ;; esac

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

unset _interop_env_dir
