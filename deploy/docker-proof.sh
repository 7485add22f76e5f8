#!/usr/bin/env bash
# Proves the Dockerfile on a machine with no image registry (not run by CI): starts a private
# dockerd (own data root and socket, no bridge, no iptables), builds a Debian bookworm base with
# debootstrap, builds the image on it, runs it on the host network on 127.0.0.1, waits for the
# healthcheck, sends one chat request with the key from the container's data volume, then stops
# the container during a stream and checks the drain, the exit code, and cleans up.
#
#   sudo deploy/docker-proof.sh            # everything in a temporary folder, removed at the end
#   sudo PROOF_DIR=/var/tmp/lsp deploy/docker-proof.sh   # keep the folder: the base and the
#                                          # layer cache are reused by the next run
#   sudo BENCH=1 deploy/docker-proof.sh    # also compare decode speed with this host's venv
#
# Needs root, dockerd (Debian: docker.io), debootstrap and curl. Nothing listens on anything
# but 127.0.0.1.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-18080}
HOST_PORT=${HOST_PORT:-18081}
IMAGE=llmserve:proof
BASE_IMAGE=llmserve-base:bookworm
NAME=llmserve-proof
KEEP=${PROOF_DIR:+1}
WORK=${PROOF_DIR:-$(mktemp -d /tmp/lsp.XXXXXX)}
mkdir -p "$WORK"
SOCK="$WORK/docker.sock"
export DOCKER_HOST="unix://$SOCK"
DOCKERD_PID=""
HOST_PID=""

say() { printf '\n== %s\n' "$*"; }

cleanup() {
    set +e
    if [ -n "$HOST_PID" ]; then kill "$HOST_PID" 2>/dev/null; wait "$HOST_PID" 2>/dev/null; fi
    if [ -n "$DOCKERD_PID" ]; then
        docker rm -f "$NAME" >/dev/null 2>&1
        say "stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && echo "dockerd still running" >&2
    fi
    # What dockerd may leave mounted under its roots (overlay layers, the exec root's netns).
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    if [ -z "$KEEP" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

# The Debian mirror this machine's apt uses (deb822 or one-line sources).
debian_mirror() {
    local uri
    uri=$(grep -hsE '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
    [ -n "$uri" ] || uri=$(grep -hsE '^deb .*debian/? bookworm' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list | head -n1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

# pip's index as this machine configures it; file:// indexes are host paths a build cannot
# see, so only http(s) ones are passed on.
pip_index() {
    local url=${PIP_INDEX_URL:-}
    [ -n "$url" ] || url=$(pip config get global.index-url 2>/dev/null || true)
    case "$url" in http://* | https://*) echo "$url" ;; *) echo "https://pypi.org/simple" ;; esac
}

# Locally added CA certificates (a TLS-intercepting proxy's, e.g.): the builder trusts them.
extra_ca_certs() {
    cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true
}

start_dockerd() {
    say "starting dockerd in $WORK (no bridge, no iptables)"
    dockerd --data-root "$WORK/root" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
        --host "$DOCKER_HOST" --bridge=none --iptables=false --ip-forward=false \
        --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        if docker version >/dev/null 2>&1; then
            docker version --format 'dockerd {{.Server.Version}}, client {{.Client.Version}}'
            return 0
        fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    tail -n 20 "$WORK/dockerd.log" >&2
    echo "dockerd did not start" >&2
    exit 1
}

make_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE exists"
        return
    fi
    local mirror rootfs="$WORK/rootfs"
    mirror=$(debian_mirror)
    say "debootstrap --variant=minbase bookworm from $mirror"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
    tail -n 1 "$WORK/debootstrap.log"
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE"
    rm -rf "$rootfs"
}

build_image() {
    say "docker build (BASE=$BASE_IMAGE, pip index $(pip_index))"
    # The legacy builder (no buildx here) builds every stage before the target: name it.
    docker build --network host --target runtime --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "PIP_INDEX_URL=$(pip_index)" --build-arg "EXTRA_CA_CERTS=$(extra_ca_certs)" \
        -t "$IMAGE" "$REPO" 2>&1 | tee "$WORK/build.log" | grep -E '^Step |Successfully|error' || true
    docker image inspect "$IMAGE" >/dev/null || { tail -n 40 "$WORK/build.log" >&2; exit 1; }
    docker image ls "$IMAGE"
}

run_container() {
    say "docker run --network host on 127.0.0.1:$PORT"
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    docker volume rm "$NAME-data" >/dev/null 2>&1 || true
    # As compose.yaml runs it: read-only root, no capabilities, no privilege gain.
    docker run -d --name "$NAME" --network host --init --read-only --tmpfs /tmp \
        --cap-drop ALL --security-opt no-new-privileges \
        -e LLMSERVE_HOST=127.0.0.1 -e "LLMSERVE_PORT=$PORT" -v "$NAME-data:/data" "$IMAGE"
    local status=""
    for _ in $(seq 120); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
        [ "$status" = healthy ] && break
        [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
        sleep 2
    done
    echo "health: $status"
    docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}} {{.Start}}{{"\n"}}{{end}}' "$NAME" \
        | tail -n 2
    [ "$status" = healthy ] || { docker logs "$NAME" 2>&1 | tail -n 30; exit 1; }
    docker exec "$NAME" id
}

api_key() {
    docker exec "$NAME" llmserve keys | sed -n 's/^api_key: *//p' | tr -d "'\""
}

chat() {
    local key
    key=$(api_key)
    say "one chat request (key from the container's /data/api_tokens.yml)"
    curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":32,"temperature":0}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("model:", r["model"]); print("answer:", r["choices"][0]["message"]["content"]); print("usage:", r["usage"])'
    echo "without a key: HTTP $(curl -s -o /dev/null -w '%{http_code}' \
        "http://127.0.0.1:$PORT/v1/models")"
}

# Three 128-token decodes (ignore_eos); rough tokens/s from usage and the client's clock.
bench() {
    local url=$1 key=$2 label=$3
    python3 - "$url" "$key" "$label" <<'EOF'
import json, sys, time, urllib.request
url, key, label = sys.argv[1:]
rates = []
for i in range(4):
    body = {"messages": [{"role": "user", "content": f"Count slowly from {i}."}],
            "max_tokens": 128, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    start = time.perf_counter()
    usage = json.load(urllib.request.urlopen(req, timeout=120))["usage"]
    elapsed = time.perf_counter() - start
    if i:  # the first request warms up
        rates.append(usage["completion_tokens"] / elapsed)
print(f"{label}: " + " ".join(f"{r:.1f}" for r in rates) + " tok/s (128 tokens each, end to end)")
EOF
}

# Interleaved (container, host, container, host): the load of a shared machine changes.
bench_both() {
    local venv="$REPO/.venv/bin/llmserve" data="$WORK/host-data"
    mkdir -p "$data"
    "$venv" serve --host 127.0.0.1 --port "$HOST_PORT" --data-dir "$data" \
        --api-key proof-key >"$WORK/host.log" 2>&1 &
    HOST_PID=$!
    for _ in $(seq 60); do
        curl -fsS -o /dev/null "http://127.0.0.1:$HOST_PORT/health" 2>/dev/null && break
        sleep 1
    done
    say "decode speed, container (GGML_NATIVE=OFF) vs host venv (native build)"
    for round in 1 2; do
        echo "round $round, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
        bench "http://127.0.0.1:$PORT" "$(api_key)" "container GGML_NATIVE=OFF"
        bench "http://127.0.0.1:$HOST_PORT" proof-key "host native          "
    done
    kill "$HOST_PID"
    wait "$HOST_PID" || true
    HOST_PID=""
}

# docker stop while a stream runs: the server drains, the stream ends, the exit code is 0.
stop_container() {
    local key stream="$WORK/stream.txt"
    key=$(api_key)
    say "docker stop during a stream"
    curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Tell a story."}],"max_tokens":400,"ignore_eos":true,"stream":true}' \
        >"$stream" &
    local client=$!
    sleep 1
    docker stop -t 60 "$NAME" >/dev/null
    wait "$client" || true
    echo "exit code: $(docker inspect -f '{{.State.ExitCode}}' "$NAME")," \
        "OOM killed: $(docker inspect -f '{{.State.OOMKilled}}' "$NAME")"
    echo "stream: $(grep -c '^data: {' "$stream") chunks, last: $(grep '^data:' "$stream" | tail -n 1)"
    grep -o '"finish_reason":"[a-z]*"' "$stream" | tail -n 1
    docker logs "$NAME" 2>&1 | grep -iE 'shutting down|finished|shutdown|drain|stopping' | tail -n 5
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$NAME")" = 0 ]
}

[ "$(id -u)" = 0 ] || { echo "run as root (dockerd, debootstrap)" >&2; exit 1; }
start_dockerd
make_base
build_image
run_container
chat
[ -z "${BENCH:-}" ] || bench_both
stop_container
say "proof passed"
