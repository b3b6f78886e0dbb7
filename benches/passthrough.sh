#!/usr/bin/env bash
# Pass-through throughput: Tollgate vs nginx as a plain reverse proxy, same
# machine, same run, one core each. Tollgate does its whole job on every
# request: the key is checked, the customer's limits admit it, the JSON
# response is scanned for usage, a usage row is spooled and written (to a
# throwaway Postgres database by default: "fully metered, Postgres backend"),
# and the metrics are counted. nginx only forwards.
#
#   CPU 0: wrk (1 thread) and the upstream (nginx, 1 worker, fixed JSON body)
#   CPU 1: the proxy under test, in turn: tollgate (1 tokio worker) or nginx
#          (worker_processes 1, keep-alive upstream pool)
#   Postgres is not pinned: it writes the usage rows wherever it can, as it
#   would beside a real gateway.
#
# "hyper" is the framework's floor: a plain reverse proxy on the same hyper
# and tokio (benches/hyper_proxy.rs: hyper's server, hyper-util's pooled
# client, one worker, jemalloc) doing none of the gateway's work. nginx
# against it is what the HTTP stack costs; it against tollgate is what the
# gateway's own work costs.
#
# "tollgate+keylim" is the same gateway called with a key that has limits
# of its own (a rate and a quota, out of reach, as its customer's are), so
# every request is admitted at both the key's and the customer's level and
# the answers carry the same headers: the price of per-key limits, in the
# same run.
#
# CPU per request is the proxy process's user and system time (all its
# threads, and nginx's worker) over the measured run, divided by the
# requests wrk completed in it.
# "db cpu/req" is the Postgres server's CPU (user + system, all its
# processes) over the same run and requests, when the server runs on this
# machine ("-" otherwise, and on SQLite, whose work is in the gateway's own
# CPU): the database's side of metering, which no proxy's column counts.
# For nginx and the hyper proxy it is the server's background work alone.
#
# Each proxy is measured ROUNDS times, alternating (each round starting with
# the next proxy of the list), and the median is reported,
# because these machines are shared and noisy: only ratios within one run mean
# anything. Added latency is the proxy's p50/p99 minus the upstream's own
# (wrk straight at the upstream, same connections).
#
# After the throughput table:
#
# - One connection: in every round, right after its throughput run, the
#   upstream, nginx, the hyper proxy, tollgate and the COMPARE_BIN build
#   are also measured with a single connection
#   (wrk -t1 -c1, same duration), so the latency of one request at a time
#   is compared in the same alternating rounds; medians, and what nginx and
#   tollgate add over the upstream's own p50 and p99.
# - SSE time to first byte: a second route, /sse/, goes to the mock upstream
#   (`tollgate mock-upstream`, an OpenAI-compatible server on CPU 0) with the
#   prefix stripped. SSE_REQUESTS streaming chat completions are sent
#   straight to the mock and as many through the gateway, alternating, one
#   curl each (a new connection each time, on both sides); median and p90 of
#   curl's time_starttransfer, and the difference. The target: within 1 ms
#   of direct. Through the gateway a request crosses between the cores four
#   times (curl and the mock on CPU 0, the gateway on CPU 1), and on a
#   loaded machine each crossing can wait for the scheduler: this figure
#   grows with the machine's load more than the others do.
# - Rows check: the gateway is started once more and sent exactly
#   CHECK_REQUESTS requests (h2load, 64 connections) with a key made only
#   for this, stopped with SIGTERM (it flushes its spool before it exits),
#   and the usage rows of that key are counted: exactly one row per request,
#   no id twice, or the script exits 1. That every request was metered is
#   the point of the throughput figure, so it is checked in the same run.
#
# Usage: benches/passthrough.sh [duration_secs=10] [connections=64] [rounds=3]
#   TOLLGATE_BIN=path      measure this build (else target/release/tollgate, built first)
#   COMPARE_BIN=path       also measure another build in the same rounds (row "other")
#   FLOOR_BIN=path         the plain hyper proxy (else built: cargo build --release --example hyper_proxy)
#   PROFILE=perf.data      perf record tollgate during round 1's run
#                          (PROFILE_HZ=4999, PROFILE_CALLGRAPH=-g, e.g. "--call-graph dwarf")
#   BENCH_DATABASE=postgres|sqlite   the usage store (default postgres)
#   BENCH_BODY=small|openai          the upstream's answer: 110 bytes of usage (default),
#                          or a whole OpenAI chat completion of about 700 bytes
#   BENCH_REQUEST=get|chat           the client's request: a GET (default), or a POST of a
#                          chat completion request of about 1 KB of JSON
#   BENCH_DATABASE_URL=postgres://user@host:port   the Postgres server (default
#                          postgres://postgres@127.0.0.1:5432, no database name): a
#                          database tollgate_bench_<pid> is made on it and dropped at the end
#   CHECK_REQUESTS=20000   requests in the rows check
#   SSE_REQUESTS=200       streaming requests each way in the SSE measurement
# Needs: nginx, wrk, h2load, curl, taskset (apt-get install nginx wrk
# nghttp2-client curl util-linux); psql for Postgres (postgresql-client);
# sqlite3 for the rows check on SQLite (skipped without it).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
CONNS="${2:-64}"
ROUNDS="${3:-3}"
CHECK_REQUESTS="${CHECK_REQUESTS:-20000}"
SSE_REQUESTS="${SSE_REQUESTS:-200}"
UPSTREAM_PORT=18181
NGINX_PORT=18182
GATEWAY_PORT=18183
GATEWAY_ADMIN_PORT=18184
MOCK_PORT=18185
HYPER_PORT=18186

. benches/lib.sh
bench_need "apt-get install nginx wrk nghttp2-client curl util-linux" nginx wrk h2load curl taskset
bench_database
DB_NAME="tollgate_bench_$$"
bench_binary
bench_floor
WORK="$(mktemp -d)"
request_args
PIDS=()
PROXY_PID=
DB_CREATED=
cleanup() {
    # The proxy too: a failed measurement leaves one running, and wait would
    # wait for it forever.
    for pid in "${PIDS[@]}" $PROXY_PID; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # FORCE (Postgres 13+): a gateway that did not stop in time must not
    # leave the database behind.
    [ -n "$DB_CREATED" ] && pg_admin -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$BENCH_DATABASE" = postgres ]; then
    pg_admin -c "CREATE DATABASE $DB_NAME" >/dev/null
    DB_CREATED=1
    DATABASE_URL="$PG_SERVER/$DB_NAME"
else
    DATABASE_URL="sqlite://$WORK/tollgate.db"
fi

nginx_conf upstream "$UPSTREAM_PORT" "$UPSTREAM_LOCATION" '' '' reuseport
nginx_conf proxy "$NGINX_PORT" "$PROXY_LOCATION" "$(proxy_upstream "$UPSTREAM_PORT")" '' reuseport

{
    gateway_config "$GATEWAY_PORT" "$GATEWAY_ADMIN_PORT" "$DATABASE_URL" "$WORK/spool" "$UPSTREAM_PORT"
    cat <<CONF

# The SSE time to first byte: the mock upstream streams chat completions;
# /sse/v1/chat/completions reaches it as /v1/chat/completions.
[[routes]]
name = "sse"
prefix = "/sse/"
upstream = "http://127.0.0.1:$MOCK_PORT"
strip_prefix = true
usage = "openai"
CONF
} > "$WORK/tollgate.toml"

# keys create runs the migrations on the bench database, and prints the
# key (once) and its id as JSON; a field of it, by name.
new_key() { # name customer [flags...]: writes $WORK/key-<name>.json
    local name="$1" customer="$2"; shift 2
    "$BIN" --config "$WORK/tollgate.toml" keys create --customer "$customer" --tier bench "$@" --json \
        > "$WORK/key-$name.json"
}
new_key plain bench
KEY="$(json_field key "$WORK/key-plain.json")"
[ -n "$KEY" ] || { echo "error: could not create a bench key" >&2; exit 1; }
new_key limited bench-keyed --rate 1000000000/s --monthly-requests 1000000000000
LIMITED_KEY="$(json_field key "$WORK/key-limited.json")"
[ -n "$LIMITED_KEY" ] || { echo "error: could not create a bench key with limits" >&2; exit 1; }
# The rows check's key serves nothing else, so its rows are exactly the
# check's requests.
new_key check bench-check
CHECK_KEY="$(json_field key "$WORK/key-check.json")"
CHECK_KEY_ID="$(json_field id "$WORK/key-check.json")"
[ -n "$CHECK_KEY" ] && [ -n "$CHECK_KEY_ID" ] || { echo "error: could not create the rows check's key" >&2; exit 1; }

taskset -c 0 nginx -c "$WORK/upstream/nginx.conf" & PIDS+=($!)
RUST_LOG=warn taskset -c 0 "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" 2>"$WORK/mock.log" & PIDS+=($!)
wait_port "$UPSTREAM_PORT"
wait_port "$MOCK_PORT"

start_proxy() { # tollgate | tollgate+keylim | nginx | hyper | other
    case "$1" in
        other)
            RUST_LOG=warn taskset -c 1 "$COMPARE_BIN" --config "$WORK/tollgate.toml" serve 2>"$WORK/other.log" &
            PROXY_PID=$!; wait_port "$GATEWAY_PORT" "$PROXY_PID" "$WORK/other.log"; PROXY_PORT=$GATEWAY_PORT ;;
        tollgate*)
            RUST_LOG=warn taskset -c 1 "$BIN" --config "$WORK/tollgate.toml" serve 2>"$WORK/tollgate.log" &
            PROXY_PID=$!; wait_port "$GATEWAY_PORT" "$PROXY_PID" "$WORK/tollgate.log"; PROXY_PORT=$GATEWAY_PORT ;;
        nginx)
            taskset -c 1 nginx -c "$WORK/proxy/nginx.conf" &
            PROXY_PID=$!; wait_port "$NGINX_PORT"; PROXY_PORT=$NGINX_PORT ;;
        hyper)
            taskset -c 1 "$FLOOR_BIN" "127.0.0.1:$HYPER_PORT" "http://127.0.0.1:$UPSTREAM_PORT" 2>"$WORK/hyper.log" &
            PROXY_PID=$!; wait_port "$HYPER_PORT" "$PROXY_PID" "$WORK/hyper.log"; PROXY_PORT=$HYPER_PORT ;;
    esac
}
# SIGTERM: the gateway stops accepting, finishes what is in flight, writes
# its spooled rows to the database and exits; wait for all of it.
stop_proxy() {
    kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
}

# User and system CPU ticks (1/CLK_TCK s) of a process, its threads and its
# children's (nginx's worker is the master's child): "user sys".
cpu_ticks() { # pid
    local pids="$1 $(pgrep -P "$1" | tr '\n' ' ')"
    for pid in $pids; do cat /proc/"$pid"/task/*/stat 2>/dev/null; done \
        | awk '{ sub(/^.*\) /, ""); u += $12; s += $13 } END { print u + 0, s + 0 }'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# The usage database's side of the rows: the CPU of the Postgres server's
# processes (its postmaster and the postmaster's children: the backends,
# the WAL writer, the checkpointer), when that server runs on this machine.
# It is found by its checkpointer, whose parent is the postmaster. Counted
# in no proxy's CPU per request, but on these two cores it runs where it
# can, beside the proxy or the load generator.
DB_SERVER_PID=
if [ "$BENCH_DATABASE" = postgres ]; then
    checkpointer="$(pg_admin -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'" 2>/dev/null || true)"
    postmaster="$(awk '/^PPid:/ { print $2 }' "/proc/${checkpointer:-none}/status" 2>/dev/null || true)"
    if [ -n "$postmaster" ] && [ "$(cat "/proc/$postmaster/comm" 2>/dev/null)" = postgres ]; then
        DB_SERVER_PID="$postmaster"
    fi
fi
db_ticks() {
    if [ -n "$DB_SERVER_PID" ]; then cpu_ticks "$DB_SERVER_PID" | awk '{ print $1 + $2 }'; else echo 0; fi
}

# Prints "rps p50_us p99_us requests" for one wrk run against a port.
measure() { # port [duration] [key] [connections]
    taskset -c 0 wrk -t1 -c"${4:-$CONNS}" -d"${2:-$DURATION}s" --latency -H "authorization: Bearer ${3:-$KEY}" "${WRK_REQUEST[@]}" \
        "http://127.0.0.1:$1/v1/chat/completions" \
        | awk '
            function us(v) {
                if (v ~ /us$/) { sub(/us$/, "", v); return v + 0 }
                if (v ~ /ms$/) { sub(/ms$/, "", v); return v * 1000 }
                if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000000 }
                return v
            }
            /Requests\/sec/ { rps = $2 }
            / requests in / { n = $1 }
            $1 == "50%" { p50 = us($2) }
            $1 == "99%" { p99 = us($2) }
            /Non-2xx/ { bad = $NF }
            END {
                if (bad > 0) { print "error: " bad " non-2xx responses" > "/dev/stderr"; exit 1 }
                printf "%.0f %.0f %.0f %d\n", rps, p50, p99, n
            }'
}

tenths() { printf '%d.%d' $(($1 / 10)) $(($1 % 10)); }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
percentile() { # p: the smallest value at or above p% of them
    sort -n | awk -v p="$1" '{ a[NR] = $1 } END { i = int((NR * p + 99) / 100); print a[i < 1 ? 1 : i] }'
}

echo "pass-through: ${DURATION}s x ${ROUNDS} rounds, ${CONNS} connections (and 1), proxy on CPU 1, wrk + upstream on CPU 0"
echo "usage rows to: ${DATABASE_URL}; upstream body: ${BENCH_BODY:-small}; request: ${BENCH_REQUEST:-get}"
: > "$WORK/results"
: > "$WORK/latency"
measure "$UPSTREAM_PORT" 2 >/dev/null   # warm the upstream
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p50 p99 _ < <(measure "$UPSTREAM_PORT")
    echo "direct $rps $p50 $p99" >> "$WORK/results"
    printf '  round %d %-15s %8s req/s  p50 %6s us  p99 %6s us\n' "$round" direct "$rps" "$p50" "$p99"
    read -r rps p50 p99 _ < <(measure "$UPSTREAM_PORT" "$DURATION" "$KEY" 1)
    echo "direct $p50 $p99" >> "$WORK/latency"
    printf '  round %d %-15s %8s req/s  p50 %6s us  p99 %6s us\n' "$round" "direct, 1 conn" "$rps" "$p50" "$p99"
    # Each round starts one place further along the list, so that no proxy
    # always runs first, right after the upstream was measured alone (the
    # first slot measured up to 13% slower than the same build later on).
    proxies=(tollgate tollgate+keylim nginx hyper ${COMPARE_BIN:+other})
    shift_by=$(( (round - 1) % ${#proxies[@]} ))
    proxies=("${proxies[@]:shift_by}" "${proxies[@]:0:shift_by}")
    for proxy in "${proxies[@]}"; do
        key="$KEY"; [ "$proxy" = "tollgate+keylim" ] && key="$LIMITED_KEY"
        start_proxy "$proxy"
        measure "$PROXY_PORT" 2 "$key" >/dev/null 2>&1 || true   # warm-up: pools, caches
        read -r u0 s0 < <(cpu_ticks "$PROXY_PID")
        d0=$(db_ticks)
        if [ -n "${PROFILE:-}" ] && [ "$proxy" = tollgate ] && [ "$round" = 1 ]; then
            perf record -q -F ${PROFILE_HZ:-4999} ${PROFILE_CALLGRAPH:--g} -p "$PROXY_PID" -o "$PROFILE" -- sleep "$DURATION" 2>/dev/null &
            PERF_PID=$!
        fi
        read -r rps p50 p99 n < <(measure "$PROXY_PORT" "$DURATION" "$key")
        [ -n "${PERF_PID:-}" ] && { wait "$PERF_PID" || true; PERF_PID=; }
        read -r u1 s1 < <(cpu_ticks "$PROXY_PID")
        d1=$(db_ticks)
        # CPU per request in tenths of a microsecond (integers for the median).
        cu=$(( (u1 - u0) * TICK_US * 10 / n )); cs=$(( (s1 - s0) * TICK_US * 10 / n ))
        cd=$(( (d1 - d0) * TICK_US * 10 / n ))
        echo "$proxy $rps $p50 $p99 $cu $cs $cd" >> "$WORK/results"
        printf '  round %d %-15s %8s req/s  p50 %6s us  p99 %6s us  cpu/req %s + %s us  db %s us\n' \
            "$round" "$proxy" "$rps" "$p50" "$p99" "$(tenths "$cu")" "$(tenths "$cs")" "$(tenths "$cd")"
        # One connection, on the same warm process.
        if [ "$proxy" != tollgate+keylim ]; then
            read -r rps p50 p99 _ < <(measure "$PROXY_PORT" "$DURATION" "$key" 1)
            echo "$proxy $p50 $p99" >> "$WORK/latency"
            printf '  round %d %-15s %8s req/s  p50 %6s us  p99 %6s us\n' "$round" "$proxy, 1 conn" "$rps" "$p50" "$p99"
        fi
        stop_proxy
    done
done

col() { awk -v who="$1" -v c="$2" '$1 == who { print $c }' "$WORK/results" | median; }
d50=$(col direct 3); d99=$(col direct 4)
row() { # proxy: the medians of its rounds
    local rps=$(col "$1" 2) p50=$(col "$1" 3) p99=$(col "$1" 4) cu=$(col "$1" 5) cs=$(col "$1" 6) cd=$(col "$1" 7)
    printf '%-15s %10s %8s %14s %14s %20s %14s\n' "$1" "$rps" \
        "$(awk -v a="$rps" -v b="$n_rps" 'BEGIN { printf "%.2f", a / b }')" \
        "$((p50 - d50))" "$((p99 - d99))" "$(tenths "$cu") + $(tenths "$cs")" \
        "$([ -n "$DB_SERVER_PID" ] && tenths "$cd" || echo -)"
}
t_rps=$(col tollgate 2); k_rps=$(col tollgate+keylim 2); n_rps=$(col nginx 2); h_rps=$(col hyper 2)
echo
printf '%-15s %10s %8s %14s %14s %20s %14s\n' proxy "req/s" "x nginx" "added p50 us" "added p99 us" "cpu/req user+sys us" "db cpu/req us"
row nginx
row hyper
row tollgate
row tollgate+keylim
[ -n "${COMPARE_BIN:-}" ] && row other
[ -n "${COMPARE_BIN:-}" ] && awk -v t="$t_rps" -v o="$(col other 2)" 'BEGIN { printf "this build vs COMPARE_BIN: %.3f\n", t / o }'
awk -v k="$k_rps" -v t="$t_rps" 'BEGIN { printf "key limits on every request vs none: %.3f\n", k / t }'
awk -v t="$t_rps" -v n="$n_rps" 'BEGIN { printf "throughput ratio tollgate/nginx: %.2f\n", t / n }'
awk -v h="$h_rps" -v n="$n_rps" -v t="$t_rps" 'BEGIN { printf "the framework floor: hyper/nginx %.2f, tollgate/hyper %.2f\n", h / n, t / h }'

# One connection: medians of the rounds, and what each proxy adds over the
# upstream's own latency.
lat() { awk -v who="$1" -v c="$2" '$1 == who { print $c }' "$WORK/latency" | median; }
l50=$(lat direct 2); l99=$(lat direct 3)
echo
echo "one connection (wrk -t1 -c1, ${DURATION}s, median of ${ROUNDS} rounds):"
printf '%-15s %10s %10s %14s %14s\n' "" "p50 us" "p99 us" "added p50 us" "added p99 us"
printf '%-15s %10s %10s %14s %14s\n' direct "$l50" "$l99" - -
for proxy in nginx hyper tollgate ${COMPARE_BIN:+other}; do
    p50=$(lat "$proxy" 2); p99=$(lat "$proxy" 3)
    printf '%-15s %10s %10s %14s %14s\n' "$proxy" "$p50" "$p99" "$((p50 - l50))" "$((p99 - l99))"
done

# SSE time to first byte: straight to the mock and through the gateway,
# alternating, so both see the same moments of the machine's noise.
SSE_BODY='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hello there, how are you today?"}]}'
ttfb_us() { # url [key]: microseconds to the answer's first byte
    local out
    out="$(taskset -c 0 curl -s -o /dev/null -w '%{time_starttransfer} %{http_code}' \
        -H 'content-type: application/json' ${2:+-H "authorization: Bearer $2"} -d "$SSE_BODY" "$1")"
    [ "${out#* }" = 200 ] || { echo "error: $1 answered ${out#* } to a streaming chat completion" >&2; exit 1; }
    awk -v s="${out% *}" 'BEGIN { printf "%.0f\n", s * 1000000 }'
}
start_proxy tollgate
for _ in $(seq 1 20); do   # warm-up: the upstream pool, the key cache
    ttfb_us "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" >/dev/null
    ttfb_us "http://127.0.0.1:$GATEWAY_PORT/sse/v1/chat/completions" "$KEY" >/dev/null
done
: > "$WORK/ttfb-direct"; : > "$WORK/ttfb-tollgate"
for _ in $(seq 1 "$SSE_REQUESTS"); do
    ttfb_us "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" >> "$WORK/ttfb-direct"
    ttfb_us "http://127.0.0.1:$GATEWAY_PORT/sse/v1/chat/completions" "$KEY" >> "$WORK/ttfb-tollgate"
done
stop_proxy
s50=$(median < "$WORK/ttfb-direct"); s90=$(percentile 90 < "$WORK/ttfb-direct")
g50=$(median < "$WORK/ttfb-tollgate"); g90=$(percentile 90 < "$WORK/ttfb-tollgate")
echo
echo "SSE time to first byte (curl time_starttransfer, ${SSE_REQUESTS} each way, alternating, a new connection each):"
printf '%-15s %10s %10s\n' "" "p50 us" "p90 us"
printf '%-15s %10s %10s\n' direct "$s50" "$s90"
printf '%-15s %10s %10s\n' tollgate "$g50" "$g90"
printf '%-15s %10s %10s   (target: p50 within 1000 us of direct)\n' "added" "$((g50 - s50))" "$((g90 - s90))"

# Rows check: exactly CHECK_REQUESTS requests with the check's key, a
# graceful stop, then one row per request in the database.
echo
start_proxy tollgate
read -r succeeded ok2xx < <(taskset -c 0 h2load --h1 -n "$CHECK_REQUESTS" -c 64 -t 1 \
    -H "authorization: Bearer $CHECK_KEY" "${H2LOAD_REQUEST[@]}" "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" \
    | awk '/^requests:/ { for (i = 2; i <= NF; i++) if ($i == "succeeded,") ok = $(i - 1) }
           /^status codes:/ { s2xx = $3 }
           END { print ok + 0, s2xx + 0 }')
kill "$PROXY_PID"
rc=0; wait "$PROXY_PID" || rc=$?
PROXY_PID=
if [ "$rc" != 0 ]; then   # the work directory goes at exit: show the log's end now
    echo "warning: the gateway exited with status $rc on SIGTERM; its log ends:" >&2
    tail -n 5 "$WORK/tollgate.log" >&2
fi
if [ "$succeeded" != "$CHECK_REQUESTS" ] || [ "$ok2xx" != "$CHECK_REQUESTS" ]; then
    echo "rows check: FAILED, h2load: $succeeded of $CHECK_REQUESTS requests succeeded, $ok2xx answered 2xx" >&2
    exit 1
fi
ROWS_SQL="SELECT count(*), count(DISTINCT id) FROM usage_events WHERE key_id = '$CHECK_KEY_ID'"
if [ "$BENCH_DATABASE" = postgres ]; then
    read -r rows ids < <(psql "$DATABASE_URL" -X -q -At -F ' ' -v ON_ERROR_STOP=1 -c "$ROWS_SQL")
elif command -v sqlite3 >/dev/null; then
    read -r rows ids < <(sqlite3 -separator ' ' "$WORK/tollgate.db" "$ROWS_SQL")
else
    echo "rows check: skipped, no sqlite3 CLI to count the rows of $WORK/tollgate.db"
    exit 0
fi
echo "rows check (h2load --h1 -n $CHECK_REQUESTS -c 64, its own key, SIGTERM, then counted):"
echo "rows written / requests sent: $rows / $CHECK_REQUESTS (distinct ids: $ids)"
if [ "$rows" != "$CHECK_REQUESTS" ] || [ "$ids" != "$rows" ]; then
    echo "rows check: FAILED, every request must have exactly one row" >&2
    exit 1
fi
