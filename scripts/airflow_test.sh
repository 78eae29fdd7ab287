#!/usr/bin/env bash
# Build a separate virtualenv with Apache Airflow 3 (3.3.x) and mlm-scorer[tf], then run the Airflow DAG
# test (tests/test_airflow.py) with the main venv's pytest. Airflow never goes into the main venv: its
# pins (SQLAlchemy, pydantic, ...) are its own business.
#
#   scripts/airflow_test.sh            # build/reuse .venv-airflow, run the test (fails if it would skip)
#   AIRFLOW_VENV=/tmp/af scripts/airflow_test.sh
#
# The venv is rebuilt only when pyproject.toml or AIRFLOW_VERSION changes (a stamp file records both);
# pip's cache makes a rebuild a few minutes. Needs the main .venv (`make test` builds it) for the tiny
# test model (torch/transformers) and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
AIRFLOW_VENV=${AIRFLOW_VENV:-.venv-airflow}
AIRFLOW_VERSION=${AIRFLOW_VERSION:-3.3.*}
MAIN_VENV=${MAIN_VENV:-.venv}

key="$(printf '%s\n' "$AIRFLOW_VERSION" | cat - pyproject.toml | sha256sum | cut -c1-16)"
stamp="$AIRFLOW_VENV/.deps-$key"
if [ ! -f "$stamp" ]; then
  echo "airflow_test.sh: building $AIRFLOW_VENV (apache-airflow==$AIRFLOW_VERSION + mlm-scorer[tf])" >&2
  rm -rf "$AIRFLOW_VENV"
  "$PYTHON" -m venv "$AIRFLOW_VENV"
  "$AIRFLOW_VENV/bin/pip" install -q --upgrade pip
  # One resolve for both, so pip finds versions that satisfy Airflow and TensorFlow together.
  "$AIRFLOW_VENV/bin/pip" install -q "apache-airflow==$AIRFLOW_VERSION" -e '.[tf]'
  "$AIRFLOW_VENV/bin/pip" check || echo "airflow_test.sh: warning: pip check reported conflicts (above)" >&2
  touch "$stamp"
fi
"$AIRFLOW_VENV/bin/python" -c 'import airflow, mlm_scorer; print("airflow", airflow.__version__)'

if [ ! -x "$MAIN_VENV/bin/python" ]; then
  echo "airflow_test.sh: $MAIN_VENV is missing; run 'make test' first (it builds the main venv)" >&2
  exit 2
fi
# MLM_REQUIRE_AIRFLOW=1: a skip would hide a broken environment, so the test fails instead.
MLM_AIRFLOW_VENV="$AIRFLOW_VENV" MLM_REQUIRE_AIRFLOW=1 \
  "$MAIN_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_airflow.py "$@"
