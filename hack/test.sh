#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it: the chart's lint (make helm-check),
# unit, integration (PostgreSQL) and end-to-end (the local cluster, started when missing)
# tests, the Helm tier among them (tests/e2e/test_helm_*.py). Installs what it needs.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
"$HACK_DIR/install-deps.sh"
"$HACK_DIR/build-binaries.sh"
# The chart: its CRDs are those of crds/, and `helm lint --strict` is clean.
make -s -C "$REPO_ROOT" helm-check
export KUBETASK_TEST_LOGS="${KUBETASK_TEST_LOGS:-$REPO_ROOT/.test-logs}"
mkdir -p "$KUBETASK_TEST_LOGS"
set +e
.venv/bin/pytest -ra --junitxml="$KUBETASK_TEST_LOGS/junit.xml" "$@" tests
rc=$?
set -e
if [[ $rc == 5 ]]; then
  die "pytest collected no tests: that is a failure, not a pass"
fi
exit $rc
