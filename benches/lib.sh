# The set-up the shell benchmarks share (passthrough.sh, instructions.sh):
# the usage database, the build under test, the nginx configs, the
# gateway's config and its keys. Sourced, not run; the scripts that source
# it run under `set -euo pipefail` and set WORK (a scratch directory) before
# calling nginx_conf or gateway_config.

# Exits unless every tool is installed; `hint` says what to install.
bench_need() { # hint tool...
    local hint="$1"; shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "error: $tool not found ($hint)" >&2; exit 1; }
    done
}

# The usage store, checked before anything is built or started, so that a
# Postgres that is down costs seconds, not a build. BENCH_DATABASE is
# postgres (the default) or sqlite. On Postgres it sets PG_SERVER (the
# server, no database name) and defines pg_admin (psql on the server's
# `postgres` database, for creating and dropping the bench's databases).
bench_database() {
    BENCH_DATABASE="${BENCH_DATABASE:-postgres}"
    case "$BENCH_DATABASE" in
        postgres)
            bench_need "apt-get install postgresql-client, or run with BENCH_DATABASE=sqlite" psql
            PG_SERVER="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
            PG_SERVER="${PG_SERVER%/}"
            pg_admin() { PGCONNECT_TIMEOUT=5 psql "$PG_SERVER/postgres" -X -q -At -v ON_ERROR_STOP=1 "$@"; }
            pg_admin -c 'SELECT 1' >/dev/null 2>&1 || {
                echo "error: cannot reach Postgres at BENCH_DATABASE_URL=$PG_SERVER" >&2
                echo "       (point BENCH_DATABASE_URL at a server, postgres://user@host:port, or run with BENCH_DATABASE=sqlite)" >&2
                exit 1
            } ;;
        sqlite) ;;
        *) echo "error: BENCH_DATABASE must be postgres or sqlite, not '$BENCH_DATABASE'" >&2; exit 2 ;;
    esac
}

# BIN: the build to measure, TOLLGATE_BIN if set (say, another commit's),
# else this checkout's release build, built first.
bench_binary() {
    if [ -n "${TOLLGATE_BIN:-}" ]; then
        BIN="$TOLLGATE_BIN"
    else
        cargo build --release --locked -q
        BIN="$PWD/target/release/tollgate"
    fi
}

# FLOOR_BIN: the framework's floor (benches/hyper_proxy.rs, a plain hyper
# proxy with none of the gateway's work), FLOOR_BIN if set, else built.
bench_floor() {
    if [ -z "${FLOOR_BIN:-}" ]; then
        cargo build --release --locked -q --example hyper_proxy
        FLOOR_BIN="$PWD/target/release/examples/hyper_proxy"
    fi
}

# Waits until something listens on the port. With a pid, gives up as soon
# as that process has exited, showing the end of its log (a process under
# valgrind takes seconds, not milliseconds, to start).
wait_port() { # port [pid log]
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then
            echo "error: the process meant to listen on port $1 exited; its log ends:" >&2
            grep -v '^==[0-9]*==' "$3" | tail -n 10 >&2   # its own lines, not valgrind's
            exit 1
        fi
        sleep 0.2
    done
    echo "error: nothing listens on port $1" >&2
    exit 1
}

# A throwaway CA and a certificate for 127.0.0.1 and localhost it signed,
# in `dir`: ca.pem (for a client's or a route's trust), cert.pem and
# key.pem (for a server). Needs openssl.
make_certs() { # dir
    (
        cd "$1"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj /CN=tollgate-throwaway-ca -keyout ca.key -out ca.pem
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj /CN=localhost -keyout key.pem -out cert.csr
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >cert.ext
        openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile cert.ext -out cert.pem
    ) >"$1/openssl.log" 2>&1 || { cat "$1/openssl.log" >&2; exit 1; }
}

# The upstream's one answer, a chat completion with its usage, as JSON.
# BENCH_BODY=small (the default, the figures' body): 110 bytes, the usage
# and little else. BENCH_BODY=openai: a whole Chat Completions answer as
# OpenAI sends it (about 700 bytes: ids, a message, the usage with its
# details objects, a dated model name the bench's price list does not
# hold), which is what the usage scan reads on real traffic.
case "${BENCH_BODY:-small}" in
    small) UPSTREAM_BODY='{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}' ;;
    openai) UPSTREAM_BODY='{\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"The image shows a wooden boardwalk path running through a lush green field or meadow.\",\"refusal\":null,\"annotations\":[]},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1117,\"completion_tokens\":46,\"total_tokens\":1163,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_fc9f1d7035\"}' ;;
    *) echo "error: BENCH_BODY must be small or openai" >&2; exit 1 ;;
esac
UPSTREAM_LOCATION="location / { default_type application/json; return 200 \"$UPSTREAM_BODY\"; }"
# The client's request. BENCH_REQUEST=get (the default, the figures'
# request): a GET without a body. BENCH_REQUEST=chat: a POST of a Chat
# Completions request as an OpenAI client sends it (about 1 KB of JSON, not
# streaming); on the bench's `usage = "openai"` route the gateway reads
# such a body whole to learn whether it asks for a stream. request_args
# (call it once WORK is set) writes the body under $WORK and sets
# H2LOAD_REQUEST and WRK_REQUEST, the arguments that send it.
request_args() {
    H2LOAD_REQUEST=()
    WRK_REQUEST=()
    case "${BENCH_REQUEST:-get}" in
        get) ;;
        chat)
            local question="I am planning a two week trip through northern Italy in late spring. Which towns should I visit, how should I get between them, and what should I eat? Please keep it practical."
            printf '{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant that answers questions about travel, geography and history with care and in plain words."},{"role":"user","content":"%s %s %s"}],"temperature":0.7,"max_tokens":512}' \
                "$question" "$question" "$question" >"$WORK/request.json"
            {
                echo 'wrk.method = "POST"'
                echo 'wrk.headers["Content-Type"] = "application/json"'
                echo "wrk.body = [[$(cat "$WORK/request.json")]]"
            } >"$WORK/request.lua"
            H2LOAD_REQUEST=(-d "$WORK/request.json" -H "content-type: application/json")
            WRK_REQUEST=(-s "$WORK/request.lua")
            ;;
        *) echo "error: BENCH_REQUEST must be get or chat" >&2; exit 1 ;;
    esac
}

# nginx as the plain reverse proxy Tollgate is measured against: HTTP/1.1
# to the upstream, a keep-alive pool, X-Forwarded-For as the gateway sets it.
PROXY_LOCATION='location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }'
proxy_upstream() { # upstream-port
    echo "upstream backend { server 127.0.0.1:$1; keepalive 128; }"
}

# Writes $WORK/<name>/nginx.conf: one worker, no logs, its temporary files
# in its directory.
nginx_conf() { # name port server-block-body [http-directives] [main-directives] [listen-options]
    mkdir -p "$WORK/$1"
    cat > "$WORK/$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
${5:-}
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
    ${4:-}
    server {
        listen 127.0.0.1:$2 ${6:-};
        $3
    }
}
CONF
}

# Prints the gateway's config: one worker thread, the usage rows to
# `database`, and one route to the upstream with OpenAI usage and a price.
# The bench tier has a rate and a quota out of reach, so every request is
# admitted through both and answered with the x-ratelimit-* headers.
gateway_config() { # listen-port admin-port database-url spool-dir upstream-port
    cat <<CONF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
worker_threads = 1

[database]
url = "$3"

[usage]
spool_dir = "$4"

[[tiers]]
name = "bench"
rate = "1000000000/s"
monthly_requests = 1000000000000

[[routes]]
name = "bench"
prefix = "/"
upstream = "http://127.0.0.1:$5"
usage = "openai"

[pricing."gpt-4o-mini"]
input = 0.15
output = 0.60
CONF
}

# A string field of the JSON `keys create --json` printed (the key, once,
# and its id).
json_field() { # field file
    sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" "$2" | head -n 1
}
