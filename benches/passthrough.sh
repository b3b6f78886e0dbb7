#!/usr/bin/env bash
# Pass-through throughput: Tollgate vs nginx as a plain reverse proxy, same
# machine, same run, one core each. Tollgate does its whole job on every
# request: the key is checked, the customer's limits admit it, the JSON
# response is scanned for usage, a usage row is spooled and written, and the
# metrics are counted. nginx only forwards.
#
#   CPU 0: wrk (1 thread) and the upstream (nginx, 1 worker, fixed JSON body)
#   CPU 1: the proxy under test, in turn: tollgate (1 tokio worker) or nginx
#          (worker_processes 1, keep-alive upstream pool)
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
#
# Each proxy is measured ROUNDS times, alternating, and the median is reported,
# because these machines are shared and noisy: only ratios within one run mean
# anything. Added latency is the proxy's p50/p99 minus the upstream's own
# (wrk straight at the upstream, same connections).
#
# Usage: benches/passthrough.sh [duration_secs=10] [connections=64] [rounds=3]
#        TOLLGATE_BIN=path/to/tollgate benches/passthrough.sh ...
# Needs: nginx, wrk, taskset (apt-get install nginx wrk util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
CONNS="${2:-64}"
ROUNDS="${3:-3}"
UPSTREAM_PORT=18181
NGINX_PORT=18182
GATEWAY_PORT=18183
GATEWAY_ADMIN_PORT=18184

for tool in nginx wrk taskset; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install nginx wrk util-linux)" >&2; exit 1; }
done

# TOLLGATE_BIN measures another build (say, the previous commit's) instead.
if [ -n "${TOLLGATE_BIN:-}" ]; then
    BIN="$TOLLGATE_BIN"
else
    cargo build --release --locked -q
    BIN="$PWD/target/release/tollgate"
fi
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

nginx_conf() { # name port body-of-server-block upstream-block
    mkdir -p "$WORK/$1"
    cat > "$WORK/$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1/body;
    proxy_temp_path $WORK/$1/proxy;
    fastcgi_temp_path $WORK/$1/fastcgi;
    uwsgi_temp_path $WORK/$1/uwsgi;
    scgi_temp_path $WORK/$1/scgi;
    keepalive_requests 1000000;
    $4
    server {
        listen 127.0.0.1:$2 reuseport;
        $3
    }
}
CONF
}

nginx_conf upstream "$UPSTREAM_PORT" \
    'location / { default_type application/json; return 200 "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}"; }' ''
nginx_conf proxy "$NGINX_PORT" \
    'location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }' \
    "upstream backend { server 127.0.0.1:$UPSTREAM_PORT; keepalive 128; }"

cat > "$WORK/tollgate.toml" <<CONF
[server]
listen = "127.0.0.1:$GATEWAY_PORT"
admin_listen = "127.0.0.1:$GATEWAY_ADMIN_PORT"
worker_threads = 1

[database]
url = "sqlite://$WORK/tollgate.db"

[usage]
spool_dir = "$WORK/spool"

# A rate and a quota out of reach: every request is admitted through both,
# and answered with the x-ratelimit-* headers.
[[tiers]]
name = "bench"
rate = "1000000000/s"
monthly_requests = 1000000000000

[[routes]]
name = "bench"
prefix = "/"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
usage = "openai"

[pricing."gpt-4o-mini"]
input = 0.15
output = 0.60
CONF
KEY="$("$BIN" --config "$WORK/tollgate.toml" keys create --customer bench --tier bench --json \
    | sed -n 's/.*"key": *"\([^"]*\)".*/\1/p')"
[ -n "$KEY" ] || { echo "error: could not create a bench key" >&2; exit 1; }
LIMITED_KEY="$("$BIN" --config "$WORK/tollgate.toml" keys create --customer bench-keyed --tier bench \
    --rate 1000000000/s --monthly-requests 1000000000000 --json | sed -n 's/.*"key": *"\([^"]*\)".*/\1/p')"
[ -n "$LIMITED_KEY" ] || { echo "error: could not create a bench key with limits" >&2; exit 1; }

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "error: nothing listens on port $1" >&2
    exit 1
}

taskset -c 0 nginx -c "$WORK/upstream/nginx.conf" & PIDS+=($!)
wait_port "$UPSTREAM_PORT"

start_proxy() { # tollgate | tollgate+keylim | nginx
    case "$1" in
        tollgate*)
            RUST_LOG=warn taskset -c 1 "$BIN" --config "$WORK/tollgate.toml" serve 2>"$WORK/tollgate.log" &
            PROXY_PID=$!; wait_port "$GATEWAY_PORT"; PROXY_PORT=$GATEWAY_PORT ;;
        nginx)
            taskset -c 1 nginx -c "$WORK/proxy/nginx.conf" &
            PROXY_PID=$!; wait_port "$NGINX_PORT"; PROXY_PORT=$NGINX_PORT ;;
    esac
}

# User and system CPU ticks (1/CLK_TCK s) of a process, its threads and its
# children's (nginx's worker is the master's child): "user sys".
cpu_ticks() { # pid
    local pids="$1 $(pgrep -P "$1" | tr '\n' ' ')"
    for pid in $pids; do cat /proc/"$pid"/task/*/stat 2>/dev/null; done \
        | awk '{ sub(/^.*\) /, ""); u += $12; s += $13 } END { print u + 0, s + 0 }'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# Prints "rps p50_us p99_us requests" for one wrk run against a port.
measure() { # port [duration] [key]
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${2:-$DURATION}s" --latency -H "authorization: Bearer ${3:-$KEY}" \
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

echo "pass-through: ${DURATION}s x ${ROUNDS} rounds, ${CONNS} connections, proxy on CPU 1, wrk + upstream on CPU 0"
: > "$WORK/results"
measure "$UPSTREAM_PORT" 2 >/dev/null   # warm the upstream
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p50 p99 _ < <(measure "$UPSTREAM_PORT")
    echo "direct $rps $p50 $p99" >> "$WORK/results"
    for proxy in tollgate tollgate+keylim nginx; do
        key="$KEY"; [ "$proxy" = "tollgate+keylim" ] && key="$LIMITED_KEY"
        start_proxy "$proxy"
        measure "$PROXY_PORT" 2 "$key" >/dev/null 2>&1 || true   # warm-up: pools, caches
        read -r u0 s0 < <(cpu_ticks "$PROXY_PID")
        read -r rps p50 p99 n < <(measure "$PROXY_PORT" "$DURATION" "$key")
        read -r u1 s1 < <(cpu_ticks "$PROXY_PID")
        # CPU per request in tenths of a microsecond (integers for the median).
        cu=$(( (u1 - u0) * TICK_US * 10 / n )); cs=$(( (s1 - s0) * TICK_US * 10 / n ))
        echo "$proxy $rps $p50 $p99 $cu $cs" >> "$WORK/results"
        printf '  round %d %-15s %8s req/s  p50 %6s us  p99 %6s us  cpu/req %s + %s us\n' \
            "$round" "$proxy" "$rps" "$p50" "$p99" "$(tenths "$cu")" "$(tenths "$cs")"
        kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true
    done
done

col() { awk -v who="$1" -v c="$2" '$1 == who { print $c }' "$WORK/results" | median; }
d50=$(col direct 3); d99=$(col direct 4)
row() { # proxy: the medians of its rounds
    local rps=$(col "$1" 2) p50=$(col "$1" 3) p99=$(col "$1" 4) cu=$(col "$1" 5) cs=$(col "$1" 6)
    printf '%-15s %10s %8s %14s %14s %20s\n' "$1" "$rps" \
        "$(awk -v a="$rps" -v b="$n_rps" 'BEGIN { printf "%.2f", a / b }')" \
        "$((p50 - d50))" "$((p99 - d99))" "$(tenths "$cu") + $(tenths "$cs")"
}
t_rps=$(col tollgate 2); k_rps=$(col tollgate+keylim 2); n_rps=$(col nginx 2)
echo
printf '%-15s %10s %8s %14s %14s %20s\n' proxy "req/s" "x nginx" "added p50 us" "added p99 us" "cpu/req user+sys us"
row nginx
row tollgate
row tollgate+keylim
awk -v k="$k_rps" -v t="$t_rps" 'BEGIN { printf "key limits on every request vs none: %.3f\n", k / t }' 
awk -v t="$t_rps" -v n="$n_rps" 'BEGIN { printf "throughput ratio tollgate/nginx: %.2f\n", t / n }'
