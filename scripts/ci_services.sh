#!/usr/bin/env bash
# Services for the integration tests that need real servers (idempotent; run as root, or with sudo):
#   - Debian's chromium   -> tests/test_dashboard.py drives optuna-dashboard in a headless browser
#   - PostgreSQL (Debian) -> tests/test_postgres.py runs two workers on one shared study
# Installs what is missing, starts PostgreSQL on 127.0.0.1:5432, creates role and database
# normsearch/normsearch if missing, and prints ONE line on stdout:
#   export NORMSEARCH_TEST_POSTGRES_URL=postgresql+psycopg2://normsearch:normsearch@127.0.0.1:5432/normsearch
# Everything else goes to stderr, so `eval "$(bash scripts/ci_services.sh)"` sets the variable.
# Local use: `sudo bash scripts/ci_services.sh` once, then paste the printed line into your shell.
set -euo pipefail

DB_USER=normsearch DB_PASS=normsearch DB_NAME=normsearch DB_PORT=5432

log() { echo "ci_services: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -n bash "$0" "$@"; fi
  log "error: must run as root (apt-get install, starting PostgreSQL)"; exit 1
fi

# 1. Debian packages (apt-get update only when something is missing).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # fonts-liberation: without a font, the dashboard screenshot shows boxes instead of text
  apt-get install -y -qq --no-install-recommends "${missing[@]}" fonts-liberation >&2
fi

# 2. PostgreSQL cluster on 127.0.0.1:$DB_PORT (Debian's default: listen_addresses=localhost, md5/scram on host).
version=$(basename "$(dirname "$(dirname "$(compgen -G "/usr/lib/postgresql/*/bin/postgres" | sort -V | tail -n1)")")")
cluster() { pg_lsclusters -h | awk -v v="$version" -v f="$1" '$1 == v && $2 == "main" {print $f}'; }  # field $1
if [ -z "$(cluster 3)" ]; then
  log "creating cluster $version/main"
  pg_createcluster --port "$DB_PORT" "$version" main >&2
fi
case "$(cluster 4)" in
  online*) ;;
  *) log "starting PostgreSQL $version/main"; pg_ctlcluster "$version" main start >&2 ;;
esac
if [ "$(cluster 3)" != "$DB_PORT" ]; then
  log "error: cluster $version/main listens on port $(cluster 3), expected $DB_PORT"; exit 1
fi

# 3. Role and database (psql as the postgres superuser over the local socket).
psql_su() { (cd / && runuser -u postgres -- psql -p "$DB_PORT" -v ON_ERROR_STOP=1 -qtA "$@"); }
for _ in $(seq 30); do psql_su -c "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(psql_su -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != "1" ]; then
  log "creating role $DB_USER"
  psql_su -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'" >&2
fi
if [ "$(psql_su -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != "1" ]; then
  log "creating database $DB_NAME"
  psql_su -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >&2
fi

log "chromium: $(chromium --version 2>/dev/null || echo missing); PostgreSQL $version on 127.0.0.1:$DB_PORT"
echo "export NORMSEARCH_TEST_POSTGRES_URL=postgresql+psycopg2://$DB_USER:$DB_PASS@127.0.0.1:$DB_PORT/$DB_NAME"
