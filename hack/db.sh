#!/usr/bin/env bash
# PostgreSQL 15 (Debian's) for the local stack: its own data directory, the kubetask
# database and role, listening on 127.0.0.1 (the host) and $BRIDGE_IP (the pods).
#
#   hack/db.sh up            start it (initdb on first use); returns at once if running
#   hack/db.sh down          stop it (fast shutdown)
#   hack/db.sh status        running or not; exit 0 if running, 3 if not
#   hack/db.sh url [pods]    the SQLAlchemy URL for the host (default) or for the pods
#   hack/db.sh psql [args]   psql as kubetask on the kubetask database
source "$(dirname "$0")/lib.sh"

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PGDATA_DIR="$KUBETASK_STATE/postgres"
PG_SOCKET_DIR="$KUBETASK_STATE/postgres-socket"
PG_LOG="$LOG_DIR/postgres.log"       # lib.sh: $KUBETASK_STATE/logs
PG_PIDFILE="$PID_DIR/postgres.pid"   # lib.sh: $KUBETASK_STATE/pids; the postmaster's pid
PG_USER=postgres
DB_NAME=kubetask
DB_ROLE=kubetask
DB_PASSWORD=kubetask

# Which version of this script set the server up (its settings, pg_hba, role, database).
SETUP_STAMP="$PGDATA_DIR/kubetask.setup"
setup_hash() { sha256sum <"${BASH_SOURCE[0]}" | cut -c1-16; }

# libpq form of the host URL (psql does not know SQLAlchemy's "+psycopg").
libpq_url() { echo "${1/postgresql+psycopg:/postgresql:}"; }

as_pg() { runuser -u "$PG_USER" -- "$@"; }

pg_ctl() { as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" "$@"; }

# The postmaster of our data directory is alive (and not a zombie awaiting its reaping).
is_running() {
  [[ -f $PGDATA_DIR/PG_VERSION ]] && pg_ctl status >/dev/null 2>&1 || return 1
  local stat
  stat="$(ps -o stat= -p "$(postmaster_pid)" 2>/dev/null || true)"
  [[ -n $stat && $stat != Z* ]]
}

# It accepts connections on the host address, within a few seconds (it may be starting).
is_ready() {
  for _ in $(seq 50); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && return 0
    is_running || return 1
    sleep 0.2
  done
  return 1
}

postmaster_pid() { head -1 "$PGDATA_DIR/postmaster.pid" 2>/dev/null || true; }

record_pid() {
  mkdir -p "$(dirname "$PG_PIDFILE")"
  postmaster_pid >"$PG_PIDFILE"
}

need_root() { [[ $EUID == 0 ]] || die "hack/db.sh $1 needs root (it runs PostgreSQL as the $PG_USER user)"; }

write_config() {
  # Rewritten on every start so that a change of the contract (lib.sh) takes effect.
  cat >"$PGDATA_DIR/kubetask.conf" <<EOF
# Written by hack/db.sh on every start: edit that script, not this file.
listen_addresses = '127.0.0.1,$BRIDGE_IP'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 200
password_encryption = scram-sha-256
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  cat >"$PGDATA_DIR/pg_hba.conf" <<EOF
# Written by hack/db.sh on every start: edit that script, not this file.
# TYPE  DATABASE   USER       ADDRESS        METHOD
local   all        $PG_USER                  peer
local   $DB_NAME   $DB_ROLE                  scram-sha-256
host    all        $DB_ROLE   127.0.0.1/32   scram-sha-256
host    all        $DB_ROLE   $POD_CIDR  scram-sha-256
EOF
  chown "$PG_USER:$PG_USER" "$PGDATA_DIR/kubetask.conf" "$PGDATA_DIR/pg_hba.conf"
  chmod 600 "$PGDATA_DIR/kubetask.conf" "$PGDATA_DIR/pg_hba.conf"
}

init_cluster() {
  log "db: initdb $PGDATA_DIR"
  install -d -o "$PG_USER" -g "$PG_USER" -m 700 "$PGDATA_DIR"
  as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" --username="$PG_USER" --encoding=UTF8 --locale=C \
    --auth-local=peer --auth-host=scram-sha-256 >"$LOG_DIR/postgres-initdb.log" 2>&1 ||
    {
      cat "$LOG_DIR/postgres-initdb.log" >&2
      die "initdb failed"
    }
  echo "include_if_exists = 'kubetask.conf'" >>"$PGDATA_DIR/postgresql.conf"
}

provision() {
  as_pg "$PG_BIN/psql" -X -q -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 <<EOF
SELECT 'CREATE ROLE $DB_ROLE LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_ROLE') \gexec
ALTER ROLE $DB_ROLE WITH LOGIN CREATEDB PASSWORD '$DB_PASSWORD';  -- CREATEDB: the tests make throwaway databases
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_ROLE' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME') \gexec
ALTER DATABASE $DB_NAME OWNER TO $DB_ROLE;
EOF
}

cmd_up() {
  need_root up
  [[ -x $PG_BIN/pg_ctl ]] || die "PostgreSQL 15 is not installed ($PG_BIN): run 'make deps'"
  ensure_bridge
  if is_running && is_ready; then
    record_pid
    # This script changed since the server was set up: apply the new settings (reload,
    # or restart when postgresql settings changed) and the role/database setup.
    if [[ "$(cat "$SETUP_STAMP" 2>/dev/null)" != "$(setup_hash)" ]]; then
      local before
      before="$(sha256sum <"$PGDATA_DIR/kubetask.conf" 2>/dev/null || true)"
      write_config
      if [[ "$(sha256sum <"$PGDATA_DIR/kubetask.conf")" != "$before" ]]; then
        log "db: settings changed: restarting"
        pg_ctl -l "$PG_LOG" -m fast -w -t 60 restart >/dev/null
        record_pid
      else
        pg_ctl reload >/dev/null
      fi
      provision
      setup_hash >"$SETUP_STAMP"
    fi
    log "db: running (pid $(postmaster_pid)), $DATABASE_URL_HOST"
    return 0
  fi
  # Not running, or a postmaster that does not answer: stop what is left, start anew.
  if is_running; then pg_ctl -m fast -w -t 60 stop >/dev/null || true; fi
  mkdir -p "$LOG_DIR" "$PID_DIR"
  chmod o+x "$KUBETASK_STATE" # the postgres user must reach its data directory
  [[ -f $PGDATA_DIR/PG_VERSION ]] || init_cluster
  write_config
  install -d -o "$PG_USER" -g "$PG_USER" -m 755 "$PG_SOCKET_DIR"
  touch "$PG_LOG"
  chown "$PG_USER:$PG_USER" "$PG_LOG"
  log "db: starting PostgreSQL on 127.0.0.1:$PG_PORT and $BRIDGE_IP:$PG_PORT (log $PG_LOG)"
  # A postmaster that was just killed may linger a moment (a zombie, or children still
  # attached to its shared memory) and make the start fail: wait for it, then retry once.
  local old
  old="$(postmaster_pid)"
  if [[ -n $old ]]; then
    for _ in $(seq 75); do
      kill -0 "$old" 2>/dev/null || break
      sleep 0.2
    done
  fi
  if ! pg_ctl -l "$PG_LOG" -w -t 60 start >/dev/null 2>&1; then
    sleep 2
    if ! pg_ctl -l "$PG_LOG" -w -t 60 start >/dev/null; then
      tail -20 "$PG_LOG" >&2
      die "PostgreSQL did not start"
    fi
  fi
  record_pid
  provision
  setup_hash >"$SETUP_STAMP"
  "$PG_BIN/psql" -X -q "$(libpq_url "$DATABASE_URL_HOST")" -c 'SELECT 1' >/dev/null ||
    die "cannot connect with $DATABASE_URL_HOST"
  log "db: up (pid $(postmaster_pid)), $DATABASE_URL_HOST"
}

cmd_down() {
  need_root down
  if is_running; then
    local pid procs p left
    pid="$(postmaster_pid)"
    # The postmaster and its children (checkpointer, walwriter, backends, ...).
    procs="$pid $(pgrep -P "$pid" | tr '\n' ' ')"
    log "db: stopping PostgreSQL (pid $pid)"
    pg_ctl -m fast -w -t 60 stop >/dev/null
    for _ in $(seq 100); do
      left=""
      for p in $procs; do
        if kill -0 "$p" 2>/dev/null; then left="$left $p"; fi
      done
      [[ -z $left ]] && break
      sleep 0.1
    done
    [[ -z $left ]] || die "postgres processes still running:$left"
  else
    log "db: not running"
  fi
  rm -f "$PG_PIDFILE"
}

cmd_status() {
  if is_running; then
    echo "running (pid $(postmaster_pid)) on 127.0.0.1:$PG_PORT and $BRIDGE_IP:$PG_PORT, data $PGDATA_DIR"
    echo "host: $DATABASE_URL_HOST"
    echo "pods: $DATABASE_URL_PODS"
  else
    echo "stopped (data ${PGDATA_DIR})"
    return 3
  fi
}

cmd_url() {
  case "${1:-host}" in
  host) echo "$DATABASE_URL_HOST" ;;
  pods) echo "$DATABASE_URL_PODS" ;;
  *) die "usage: $0 url [host|pods]" ;;
  esac
}

cmd_psql() { exec "$PG_BIN/psql" "$(libpq_url "$DATABASE_URL_HOST")" "$@"; }

case "${1:-}" in
up | down | status | url | psql)
  c="$1"
  shift
  "cmd_$c" "$@"
  ;;
*)
  echo "usage: $0 up|down|status|url [pods]|psql [args]" >&2
  exit 2
  ;;
esac
