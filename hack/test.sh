#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it: the chart's lint (make helm-check),
# unit, integration (PostgreSQL) and end-to-end (the local cluster, started when missing)
# tests, the Helm tier among them (tests/e2e/test_helm_*.py). Installs what it needs.
#
# Two lanes, two pytest processes on the same cluster (each test has its own namespace,
# operator process or Helm release, and database): the end-to-end modules that mostly wait
# for the wall clock (schedules fire on the minute) and the Helm tier (each module installs
# a release of its own) run in the second, beside the rest. Every test is written to hold
# while the other lane's faults (a SIGSTOPped kube-apiserver) happen beside it, except
# those that measure timings through the API server (tests/e2e/test_leader.py): a file
# lock keeps the freeze and them apart (tests/e2e/harness.py api_server_timing).
# Arguments (e.g. -k EXPR, a path) go to one pytest process running what they select.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
"$HACK_DIR/install-deps.sh"
"$HACK_DIR/build-binaries.sh"
# The chart: its CRDs are those of crds/, and `helm lint --strict` is clean.
make -s -C "$REPO_ROOT" helm-check
export KUBETASK_TEST_LOGS="${KUBETASK_TEST_LOGS:-$REPO_ROOT/.test-logs}"
mkdir -p "$KUBETASK_TEST_LOGS"

no_tests() { die "pytest collected no tests ($1): that is a failure, not a pass"; }

if (($# > 0)); then
  set +e
  .venv/bin/pytest -ra --junitxml="$KUBETASK_TEST_LOGS/junit.xml" "$@"
  rc=$?
  set -e
  [[ $rc == 5 ]] && no_tests "$*"
  exit $rc
fi

SECOND_LANE=(tests/e2e/test_schedules.py tests/e2e/test_helm_install.py tests/e2e/test_helm_ha.py
  tests/e2e/test_helm_postgresql.py)
# The shared stack first (what the e2e fixtures would start), so that the two processes
# do not both build images or start the cluster.
if [[ -z ${KUBECONFIG:-} ]]; then "$HACK_DIR/cluster-up.sh"; fi
"$HACK_DIR/db.sh" up
"$HACK_DIR/images.sh" all

set +e
.venv/bin/pytest -ra -p no:cacheprovider --junitxml="$KUBETASK_TEST_LOGS/junit-second-lane.xml" \
  "${SECOND_LANE[@]}" >"$KUBETASK_TEST_LOGS/second-lane.log" 2>&1 &
wall_pid=$!
ignore=()
for path in "${SECOND_LANE[@]}"; do ignore+=(--ignore="$path"); done
.venv/bin/pytest -ra --junitxml="$KUBETASK_TEST_LOGS/junit.xml" "${ignore[@]}" tests
rc=$?
wait "$wall_pid"
wall_rc=$?
set -e
echo "--- the second lane (${SECOND_LANE[*]}), run beside the rest: ---"
cat "$KUBETASK_TEST_LOGS/second-lane.log"
[[ $rc == 5 ]] && no_tests "tests"
[[ $wall_rc == 5 ]] && no_tests "${SECOND_LANE[*]}"
if ((rc != 0)); then exit $rc; fi
exit $wall_rc
