#!/usr/bin/env bash
# Instructions per request: the deterministic companion of passthrough.sh.
#
# Wall-clock figures on our shared machines move by tens of percent from one
# run to the next; instruction counts do not. This runs the proxy under
# valgrind's callgrind, warms it up, zeroes the counters, sends exactly N
# requests, dumps the counters and divides. Two runs of the same build agree
# to about 0.1%, so a change of a percent is a change in the code, not in
# the machine.
#
#   upstream: nginx, fixed JSON body (as in passthrough.sh; not measured)
#   tollgate: worker_threads = 1, the bench tier and route of passthrough.sh,
#             every request metered: usage rows to a fresh database each
#             build (Postgres by default, or SQLite)
#   nginx:    the same upstream behind nginx as a plain reverse proxy
#             (master_process off, one process, keep-alive upstream pool)
#   hyper:    the same upstream behind a plain hyper proxy, none of the
#             gateway's work (benches/hyper_proxy.rs): the framework's floor
#
# Each proxy, one at a time, under callgrind:
#   1. 1000 requests (h2load --h1 -c 16) to warm pools and caches;
#   2. tollgate: wait until those requests' usage rows are in the database,
#      so the writing of the warm-up's rows is not counted;
#   3. callgrind_control -z (zero), then exactly N requests, same client;
#   4. tollgate: wait until the N requests' rows are in the database, so
#      their spooling and writing is counted, all of it, once;
#   5. callgrind_control -d (dump); instructions in the dump / N.
# The window also holds the gateway's periodic work (key changes, the usage
# sync, alerts: a few each second) for however long it takes; that is the
# ~0.1% that moves. Without sqlite3 on SQLite the rows cannot be watched and
# steps 2 and 4 sleep 3 s instead: less repeatable.
#
# Only user-space instructions are counted (callgrind runs no kernel code):
# system calls are not in it, and on Postgres the server's work on the rows
# is not either (on SQLite the database is in the process and is). CPU time,
# kernel included, is passthrough.sh's cpu/req column.
#
# Printed: tollgate's, nginx's and the plain hyper proxy's instructions per
# request and their ratios, tollgate's instructions per request by crate
# (the crate of each function's path: generic standard-library code
# instantiated for another crate's types, drop_in_place<hyper::...> say,
# counts as core/alloc/std; C code by file or library) and its top
# functions by self cost, beside the same for the plain hyper proxy (what
# the gateway adds to its HTTP stack, crate by crate). With COMPARE_BIN,
# beside the other build's instead, and the ratio this/compare.
#
# Usage: benches/instructions.sh [requests=5000]
#   TOLLGATE_BIN=path      measure this build (else target/release/tollgate, built first)
#   COMPARE_BIN=path       also measure another build the same way (column "compare")
#   FLOOR_BIN=path         the plain hyper proxy (else built: cargo build --release --example hyper_proxy)
#   BENCH_DATABASE=postgres|sqlite   the usage store (default postgres)
#   BENCH_BODY=small|openai          the upstream's answer: 110 bytes of usage (default),
#                          or a whole OpenAI chat completion of about 700 bytes
#   BENCH_REQUEST=get|chat           the client's request: a GET (default), or a POST of a
#                          chat completion request of about 1 KB of JSON
#   BENCH_DATABASE_URL=postgres://user@host:port   the Postgres server (default
#                          postgres://postgres@127.0.0.1:5432, no database name): a
#                          database tollgate_instr_<pid>_<n> is made per build, dropped at the end
#   TOP=25                 functions listed;  CRATES=20  crates listed
#   KEEP=dir               copy the callgrind dumps there (for callgrind_annotate, kcachegrind)
#   CLIENT=h1|h2c|h1-tls|h2-tls      how the client speaks to the gateway (default h1:
#                          HTTP/1.1 in the clear; h2c is HTTP/2 in the clear, the TLS
#                          ones HTTP/1.1 or HTTP/2 by ALPN over TLS to server.tls)
#   UPSTREAM=h1|h1-tls|h2-tls        how the gateway speaks to the upstream (default h1;
#                          the TLS ones to an nginx upstream on TLS, its CA in the
#                          route's ca_file, HTTP/2 where ALPN offers it)
#                          Other than h1 and h1, nginx and the hyper proxy are not
#                          measured (they would not be proxying the same way), so
#                          COMPARE_BIN is required: these compare two builds on the
#                          paths the default leaves out (TLS, HTTP/2).
# Needs: valgrind (callgrind_control), nginx, h2load, python3 (apt-get install
# valgrind nginx nghttp2-client python3); psql for Postgres; sqlite3 to watch
# the rows on SQLite; openssl for the TLS ones.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS="${1:-5000}"
WARMUP=1000
CLIENTS=16
TOP="${TOP:-25}"
CRATES="${CRATES:-20}"
UPSTREAM_PORT=19181
NGINX_PORT=19182
GATEWAY_PORT=19183
GATEWAY_ADMIN_PORT=19184
HYPER_PORT=19185
TLS_UPSTREAM_PORT=19186
CLIENT="${CLIENT:-h1}"
UPSTREAM="${UPSTREAM:-h1}"
case "$CLIENT" in h1 | h2c | h1-tls | h2-tls) ;; *)
    echo "error: CLIENT must be h1, h2c, h1-tls or h2-tls, not '$CLIENT'" >&2; exit 2 ;; esac
case "$UPSTREAM" in h1 | h1-tls | h2-tls) ;; *)
    echo "error: UPSTREAM must be h1, h1-tls or h2-tls, not '$UPSTREAM'" >&2; exit 2 ;; esac
# Whether the baselines (nginx, the hyper proxy) are measured: only where
# they proxy the way the gateway does.
BASELINES=1
if [ "$CLIENT" != h1 ] || [ "$UPSTREAM" != h1 ]; then
    BASELINES=
    [ -n "${COMPARE_BIN:-}" ] || {
        echo "error: CLIENT=$CLIENT UPSTREAM=$UPSTREAM measures no baseline: give COMPARE_BIN, the build to compare with" >&2
        exit 2
    }
fi

. benches/lib.sh
bench_need "apt-get install valgrind nginx nghttp2-client python3" valgrind callgrind_control nginx h2load python3
bench_database
bench_binary
bench_floor
WORK="$(mktemp -d)"
request_args
PIDS=()
MEASURED_PID=
DATABASES=()
cleanup() {
    for pid in "${PIDS[@]}" $MEASURED_PID; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for db in "${DATABASES[@]}"; do
        pg_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

nginx_conf upstream "$UPSTREAM_PORT" "$UPSTREAM_LOCATION"
# One process, so the one callgrind counts is the one that proxies.
nginx_conf proxy "$NGINX_PORT" "$PROXY_LOCATION" "$(proxy_upstream "$UPSTREAM_PORT")" 'master_process off;'

nginx -c "$WORK/upstream/nginx.conf" & PIDS+=($!)
wait_port "$UPSTREAM_PORT"

# TLS: a throwaway CA and a certificate for 127.0.0.1 it signed, for the
# gateway's listener and the TLS upstream alike.
if [ "$CLIENT" != "${CLIENT%-tls}" ] || [ "$UPSTREAM" != h1 ]; then
    bench_need "apt-get install openssl" openssl
    make_certs "$WORK"
fi
UPSTREAM_ORIGIN="http://127.0.0.1:$UPSTREAM_PORT"
if [ "$UPSTREAM" != h1 ]; then
    # nginx 1.22 (Debian 12) takes http2 as a listen option.
    nginx_conf tls-upstream "$TLS_UPSTREAM_PORT" \
        "ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem; $UPSTREAM_LOCATION" \
        '' '' "ssl$([ "$UPSTREAM" = h2-tls ] && echo ' http2')"
    nginx -c "$WORK/tls-upstream/nginx.conf" & PIDS+=($!)
    wait_port "$TLS_UPSTREAM_PORT"
    UPSTREAM_ORIGIN="https://127.0.0.1:$TLS_UPSTREAM_PORT"
fi
SCHEME=http
H1=--h1
case "$CLIENT" in
    h2c) H1= ;;
    h1-tls) SCHEME=https ;;
    h2-tls) SCHEME=https H1= ;;
esac

# Exactly N requests, all answered 2xx, or the run means nothing.
load() { # port n key
    local out
    out="$(h2load $H1 -n "$2" -c "$CLIENTS" -t 1 -H "authorization: Bearer $3" "${H2LOAD_REQUEST[@]}" \
        "$SCHEME://127.0.0.1:$1/v1/chat/completions")"
    echo "$out" | awk -v n="$2" '
        /^requests:/ { for (i = 2; i <= NF; i++) if ($i == "succeeded,") ok = $(i - 1) }
        /^status codes:/ { s2xx = $3 }
        END { if (ok != n || s2xx != n) { print "error: " ok + 0 " of " n " requests succeeded, " s2xx + 0 " answered 2xx" > "/dev/stderr"; exit 1 } }' ||
        { echo "$out" | tail -n 12 >&2; exit 1; }
}

# Zero the counters, run N requests, settle, dump; sets DUMP to the dump's
# path (a global, not output: a $(...) would run the measurement in a
# subshell, out of cleanup's reach). `settle` is a command run after the
# warm-up and after the N requests, with the number of requests sent so far.
callgrind_window() { # pid dir port key settle-command...
    local pid="$1" dir="$2" port="$3" key="$4"; shift 4
    load "$port" "$WARMUP" "$key"
    "$@" "$WARMUP"
    callgrind_control -z "$pid" >/dev/null 2>&1 || { echo "error: callgrind_control -z $pid failed" >&2; exit 1; }
    load "$port" "$REQUESTS" "$key"
    "$@" $((WARMUP + REQUESTS))
    callgrind_control -d "$pid" >/dev/null 2>&1 || { echo "error: callgrind_control -d $pid failed" >&2; exit 1; }
    for _ in $(seq 1 100); do [ -s "$dir/callgrind.out.1" ] && break; sleep 0.1; done
    [ -s "$dir/callgrind.out.1" ] || { echo "error: callgrind wrote no dump in $dir" >&2; exit 1; }
    DUMP="$dir/callgrind.out.1"
}

# Usage rows of one key in the database: the gateway has written them when
# the count reaches what was sent.
rows_of() { # database-url key-id
    local sql="SELECT count(*) FROM usage_events WHERE key_id = '$2'"
    case "$1" in
        postgres*) psql "$1" -X -q -At -c "$sql" 2>/dev/null || echo 0 ;;
        sqlite://*) sqlite3 "${1#sqlite://}" "$sql" 2>/dev/null || echo 0 ;;   # busy while it writes: try again
    esac
}
wait_rows() { # database-url key-id count
    if [ "${1%%:*}" = sqlite ] && ! command -v sqlite3 >/dev/null; then sleep 3; return; fi
    for _ in $(seq 1 600); do
        [ "$(rows_of "$1" "$2")" -ge "$3" ] && return 0
        sleep 0.1
    done
    echo "error: $3 usage rows expected for key $2, the database has $(rows_of "$1" "$2")" >&2
    exit 1
}
no_settle() { :; }

# The gateway's config as CLIENT and UPSTREAM ask: its listener on TLS,
# its route to the TLS upstream.
tls_options() {
    local tls='' route=''
    case "$CLIENT" in *-tls) tls="tls = { cert = \"$WORK/cert.pem\", key = \"$WORK/key.pem\" }" ;; esac
    [ "$UPSTREAM" != h1 ] && route="ca_file = \"$WORK/ca.pem\""
    awk -v tls="$tls" -v route="$route" -v origin="$UPSTREAM_ORIGIN" '
        /^upstream = / { print "upstream = \"" origin "\""; if (route != "") print route; next }
        { print }
        /^worker_threads = / && tls != "" { print tls }'
}

measure_gateway() { # name binary: sets DUMP
    local name="$1" bin="$2" dir="$WORK/$1" url key id
    mkdir -p "$dir"
    if [ "$BENCH_DATABASE" = postgres ]; then
        local db="tollgate_instr_$$_${#DATABASES[@]}"
        pg_admin -c "CREATE DATABASE $db" >/dev/null
        DATABASES+=("$db")
        url="$PG_SERVER/$db"
    else
        url="sqlite://$dir/tollgate.db"
    fi
    gateway_config "$GATEWAY_PORT" "$GATEWAY_ADMIN_PORT" "$url" "$dir/spool" "$UPSTREAM_PORT" |
        tls_options > "$dir/tollgate.toml"
    # Outside valgrind: the migrations and the key are setup, not requests.
    "$bin" --config "$dir/tollgate.toml" keys create --customer bench --tier bench --json > "$dir/key.json"
    key="$(json_field key "$dir/key.json")"
    id="$(json_field id "$dir/key.json")"
    [ -n "$key" ] && [ -n "$id" ] || { echo "error: could not create a bench key with $bin" >&2; exit 1; }
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        "$bin" --config "$dir/tollgate.toml" serve >"$dir/stdout.log" 2>"$dir/valgrind.log" &
    MEASURED_PID=$!
    wait_port "$GATEWAY_PORT" "$MEASURED_PID" "$dir/valgrind.log"
    callgrind_window "$MEASURED_PID" "$dir" "$GATEWAY_PORT" "$key" wait_rows "$url" "$id"
    # SIGTERM: it flushes and exits; the final dump at exit is not used.
    kill "$MEASURED_PID"; wait "$MEASURED_PID" 2>/dev/null || true
    MEASURED_PID=
}

measure_nginx() { # sets DUMP
    local dir="$WORK/proxy"
    valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        nginx -c "$dir/nginx.conf" >"$dir/stdout.log" 2>"$dir/valgrind.log" &
    MEASURED_PID=$!
    wait_port "$NGINX_PORT" "$MEASURED_PID" "$dir/valgrind.log"
    callgrind_window "$MEASURED_PID" "$dir" "$NGINX_PORT" no-key-needed no_settle
    kill "$MEASURED_PID"; wait "$MEASURED_PID" 2>/dev/null || true
    MEASURED_PID=
}

measure_floor() { # sets DUMP
    local dir="$WORK/hyper"
    mkdir -p "$dir"
    valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        "$FLOOR_BIN" "127.0.0.1:$HYPER_PORT" "http://127.0.0.1:$UPSTREAM_PORT" >"$dir/stdout.log" 2>"$dir/valgrind.log" &
    MEASURED_PID=$!
    wait_port "$HYPER_PORT" "$MEASURED_PID" "$dir/valgrind.log"
    callgrind_window "$MEASURED_PID" "$dir" "$HYPER_PORT" no-key-needed no_settle
    kill "$MEASURED_PID"; wait "$MEASURED_PID" 2>/dev/null || true
    MEASURED_PID=
}

# The aggregation: self cost per function from a callgrind dump, grouped.
cat > "$WORK/aggregate.py" <<'PY'
"""callgrind dump(s) -> instructions per request, by crate and by function.

aggregate.py total REQUESTS DUMP
    prints the instructions per request
aggregate.py report REQUESTS TOP CRATES BIN DUMP [COMPARE_BIN COMPARE_DUMP]
    prints the by-crate breakdown and the top functions, beside the other
    build's when given
"""
import collections
import os
import re
import sys

# Which name table each compressed "(id) name" key uses (callgrind format:
# functions, files and objects have one table each).
TABLE = {"fn": "fn", "cfn": "fn", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl",
         "cfl": "fl", "ob": "ob", "cob": "ob"}


def read(path):
    """{(object, file, function): self instructions}. A cost line after fn=
    is the function's own; the cost line after calls= is the inclusive cost
    of that call, which belongs to the callee, and is skipped."""
    names = {"fn": {}, "fl": {}, "ob": {}}
    current = {"ob": "?", "fl": "?", "fn": "?"}
    positions, skip = 1, False
    cost = collections.Counter()
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line[0].isdigit() or line[0] in "+-*":
                if skip:
                    skip = False
                    continue
                parts = line.split()
                if len(parts) > positions:
                    cost[(current["ob"], current["fl"], current["fn"])] += int(parts[positions])
                continue
            key, sep, value = line.partition("=")
            if sep and key in TABLE:
                m = re.match(r"\((\d+)\)(?: (.*))?$", value)
                if m:
                    table = names[TABLE[key]]
                    if m[2] is not None:
                        table[m[1]] = m[2]
                    value = table.get(m[1], "?")
                if key in current:
                    current[key] = value
            elif sep and key == "calls":
                skip = True
            elif line.startswith("positions:"):
                positions = len(line.split()) - 1
            elif line.startswith("events:") and line.split()[1] != "Ir":
                sys.exit(f"{path}: the first event is not Ir")
    return cost


def group(obj, file, fn, main):
    """The crate (Rust), library (shared objects) or kind of code."""
    lib = os.path.basename(obj)
    in_main = os.path.realpath(obj) == main
    if (re.match(r"(_rjem_|je_|mi_|__rust_(alloc|dealloc|realloc)|__rdl_)", fn)
            or re.search(r"jemalloc|mimalloc|^\./malloc/", file)
            or (lib.startswith("libc.so") and re.search(
                r"malloc|free|realloc|calloc|memalign|_int_|chunk|tcache|arena|sbrk", fn))):
        return "allocator"
    if lib.startswith("libc.so"):
        return "libc mem*/str*" if re.match(r"_*(mem|str|wmem|wcs)", fn) else "libc other"
    if not in_main:
        return lib
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)::", fn)
    if m:
        return m[1]
    # C (or symbols without a path) in the binary: by where the source lives.
    if file.endswith("sqlite3.c"):
        return "sqlite (C, bundled)"
    m = re.search(r"/index\.crates\.io-[^/]*/([^/]+)-\d[^/]*/|/build/([^/]+)-[0-9a-f]{16}/|/library/([^/]+)/", file)
    if m:
        return next(g for g in m.groups() if g).replace("-", "_") + " (C)"
    if fn.startswith("0x"):
        return "no symbol"
    return "C: " + (os.path.basename(file) if file not in ("?", "???") else fn)


def by(cost, main, key):
    out = collections.Counter()
    for (obj, file, fn), c in cost.items():
        out[key(obj, file, fn, main)] += c
    return out


def main():
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode == "total":
        print(round(sum(read(sys.argv[3]).values()) / n))
        return
    top, crates = int(sys.argv[3]), int(sys.argv[4])
    builds = [(os.path.realpath(sys.argv[i]), read(sys.argv[i + 1])) for i in range(5, len(sys.argv), 2)]
    compare = len(builds) > 1
    label = os.environ.get("COMPARE_LABEL", "compare")

    def table(title, key, limit, width):
        groups = [by(cost, main_bin, key) for main_bin, cost in builds]
        total = sum(builds[0][1].values())
        print(title + (f", sorted by the larger of this and {label}" if compare else ""))
        header = f"{'this':>9} {'share':>6}"
        if compare:
            header += f" {label:>9} {'diff':>8}"
        print(f"{header}  {'':{width}}".rstrip())
        names = sorted(set().union(*groups), key=lambda g: -max(x[g] for x in groups))
        shown = 0
        for name in names:
            if shown == limit:
                break
            shown += 1
            line = f"{groups[0][name] / n:9.0f} {100 * groups[0][name] / total:5.1f}%"
            if compare:
                line += f" {groups[1][name] / n:9.0f} {(groups[0][name] - groups[1][name]) / n:+8.0f}"
            print(f"{line}  {name[:width]}")
        print()

    table(f"by crate or library (self instructions per request; top {crates})",
          lambda o, fl, fn, m: group(o, fl, fn, m), crates, 40)
    table(f"top {top} functions by self instructions per request",
          lambda o, fl, fn, m: f"{fn}  [{group(o, fl, fn, m)}]", top, 140)


main()
PY

echo "instructions per request under callgrind: $REQUESTS requests after $WARMUP, h2load -c $CLIENTS; client $CLIENT, upstream $UPSTREAM; usage rows to $BENCH_DATABASE; upstream body ${BENCH_BODY:-small}; request ${BENCH_REQUEST:-get}"
measure_gateway this "$BIN"; THIS_DUMP="$DUMP"
if [ -n "${COMPARE_BIN:-}" ]; then measure_gateway compare "$COMPARE_BIN"; OTHER_DUMP="$DUMP"; fi

per_request() { python3 "$WORK/aggregate.py" total "$REQUESTS" "$1"; }
this=$(per_request "$THIS_DUMP")
if [ -z "$BASELINES" ]; then
    other=$(per_request "$OTHER_DUMP")
    echo
    printf '%-28s %12s\n' tollgate "$this" "tollgate (COMPARE_BIN)" "$other"
    awk -v t="$this" -v o="$other" 'BEGIN { printf "this build vs COMPARE_BIN (instructions/request): %.4f\n", t / o }'
    echo
    python3 "$WORK/aggregate.py" report "$REQUESTS" "$TOP" "$CRATES" "$BIN" "$THIS_DUMP" "$COMPARE_BIN" "$OTHER_DUMP"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$THIS_DUMP" "$KEEP/callgrind.tollgate.out"
        cp "$OTHER_DUMP" "$KEEP/callgrind.compare.out"
        echo "callgrind dumps in $KEEP (callgrind_annotate $KEEP/callgrind.tollgate.out)"
    fi
    exit 0
fi
measure_nginx; NGINX_DUMP="$DUMP"
measure_floor; FLOOR_DUMP="$DUMP"
nginx=$(per_request "$NGINX_DUMP")
floor=$(per_request "$FLOOR_DUMP")
echo
printf '%-28s %12s\n' tollgate "$this"
[ -n "${COMPARE_BIN:-}" ] && printf '%-28s %12s\n' "tollgate (COMPARE_BIN)" "$(per_request "$OTHER_DUMP")"
printf '%-28s %12s\n' "nginx (reverse proxy)" "$nginx"
printf '%-28s %12s\n' "hyper (plain proxy)" "$floor"
awk -v t="$this" -v n="$nginx" 'BEGIN { printf "tollgate instructions/request vs nginx instructions/request: %.2f\n", t / n }'
awk -v t="$this" -v h="$floor" -v n="$nginx" \
    'BEGIN { printf "the framework floor: hyper vs nginx %.2f, tollgate vs hyper %.2f\n", h / n, t / h }'
[ -n "${COMPARE_BIN:-}" ] && awk -v t="$this" -v o="$(per_request "$OTHER_DUMP")" \
    'BEGIN { printf "this build vs COMPARE_BIN (instructions/request): %.4f\n", t / o }'
echo
if [ -n "${COMPARE_BIN:-}" ]; then
    python3 "$WORK/aggregate.py" report "$REQUESTS" "$TOP" "$CRATES" "$BIN" "$THIS_DUMP" "$COMPARE_BIN" "$OTHER_DUMP"
else
    COMPARE_LABEL=hyper python3 "$WORK/aggregate.py" report "$REQUESTS" "$TOP" "$CRATES" "$BIN" "$THIS_DUMP" "$FLOOR_BIN" "$FLOOR_DUMP"
fi
if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$THIS_DUMP" "$KEEP/callgrind.tollgate.out"
    [ -n "${COMPARE_BIN:-}" ] && cp "$OTHER_DUMP" "$KEEP/callgrind.compare.out"
    cp "$NGINX_DUMP" "$KEEP/callgrind.nginx.out"
    cp "$FLOOR_DUMP" "$KEEP/callgrind.hyper.out"
    echo "callgrind dumps in $KEEP (callgrind_annotate $KEEP/callgrind.tollgate.out)"
fi
