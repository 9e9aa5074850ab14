#!/usr/bin/env bash
# The first thing to run: prepares the machine, starts imagefn in the background,
# deploys the two examples and calls them. Safe to run again; stop with deploy/stop.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GATEWAY=http://127.0.0.1:8080
IMAGEFN=.venv/bin/imagefn
STATE=.imagefn

step() { printf '\n==> %s\n' "$*"; }
healthy() { curl -fsS --max-time 2 "$GATEWAY/healthz" >/dev/null 2>&1; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

bash deploy/setup.sh

mkdir -p "$STATE"
if healthy; then
  step "imagefn is already running at $GATEWAY"
else
  step "starting imagefn (gateway $GATEWAY, log $STATE/up.log)"
  nohup setsid "$IMAGEFN" up >"$STATE/up.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$STATE/up.pid"
  deadline=$((SECONDS + 30))
  until healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$STATE/up.log" >&2
      echo "demo: imagefn up exited; the log is $STATE/up.log" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$STATE/up.log" >&2
      echo "demo: no answer from $GATEWAY/healthz within 30 s (pid $pid still running)" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "up (pid $pid)"
fi

step "deploying the examples"
for example in hello-event web-app; do
  "$IMAGEFN" deploy -f "examples/$example/function.yaml"
done

for call in "first call: starts an instance (cold)" "second call: reuses the warm instance"; do
  step "imagefn invoke hello-event --data '{\"name\":\"imagefn\"}'   # $call"
  t0=$(date +%s%N)
  "$IMAGEFN" invoke -v hello-event --data '{"name":"imagefn"}'
  echo "($(ms_since "$t0") ms, CLI start-up included)"
done

step "imagefn invoke hello-event --log   # the call's own log lines, read back from Kafka"
"$IMAGEFN" invoke hello-event --data '{"name":"logs"}' --log

step "imagefn invoke hello-event --async   # 202 at once; a worker runs it, retries it if it fails"
rid=$("$IMAGEFN" invoke hello-event --async --data '{"name":"async"}' | awk '{print $1}')
echo "request id: $rid"
for _ in $(seq 1 40); do  # bounded: at most ~10 s
  "$IMAGEFN" invocation "$rid" --json | grep -q '"state": *"succeeded"' && break
  sleep 0.25
done
step "imagefn invocation $rid"
"$IMAGEFN" invocation "$rid"

step "imagefn batch submit hello-event (100 items, NDJSON) --follow"
batch_file="$STATE/demo-batch.ndjson"
for i in $(seq 0 99); do echo "{\"name\":\"item $i\"}"; done >"$batch_file"
batch=$("$IMAGEFN" batch submit hello-event "$batch_file" --follow)
step "imagefn batch results $batch | head -3   # one line per item, in item order"
"$IMAGEFN" batch results "$batch" | head -3

step "web function: POST $GATEWAY/web/web-app/items"
curl -sS -i -X POST -H 'Content-Type: application/json' \
  --data '{"title":"try imagefn"}' "$GATEWAY/web/web-app/items"
echo
step "web function: GET $GATEWAY/web/web-app/items"
curl -sS -i "$GATEWAY/web/web-app/items"
echo
step "web function: GET $GATEWAY/web/web-app/echo?x=1"
curl -sS -i "$GATEWAY/web/web-app/echo?x=1"
echo

step "the three use cases of SCF image functions (examples/; the first run builds their images)"
step "model inference: imagefn deploy -f examples/inference/function.yaml   # a provisioned instance, 8 calls at once"
"$IMAGEFN" deploy -f examples/inference/function.yaml
admin_key=$(sed -n 's/^IMAGEFN_ADMIN_KEY=//p' /var/lib/imagefn/credentials.env)
step "curl -H 'Authorization: Bearer …' --data '{\"instances\": [[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}' $GATEWAY/web/inference/predict"
for _ in $(seq 1 60); do  # bounded: the provisioned instance may still be starting
  curl -sf -o /dev/null -H "Authorization: Bearer $admin_key" "$GATEWAY/web/inference/" && break
  sleep 0.5
done
curl -sS -H "Authorization: Bearer $admin_key" -H 'Content-Type: application/json' \
  --data '{"instances": [[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}' "$GATEWAY/web/inference/predict"
echo

step "a legacy web app, unchanged: imagefn deploy -f examples/legacy-web/function.yaml   # Flask's flaskr from Debian"
"$IMAGEFN" deploy -f examples/legacy-web/function.yaml
step "curl $GATEWAY/web/legacy-web/   # its links carry the /web/legacy-web prefix (X-Forwarded-Prefix)"
curl -sS "$GATEWAY/web/legacy-web/" | grep -E 'href=' | head -4
step "curl -i -X POST --data 'username=demo&password=demo' $GATEWAY/web/legacy-web/auth/register   # redirect under the prefix"
curl -sS -i -X POST --data "username=demo-$RANDOM&password=demo" \
  "$GATEWAY/web/legacy-web/auth/register" | grep -iE '^(HTTP|location)'

step "media processing: bash examples/media/deploy.sh   # buckets, the function's own store keys, a cos trigger"
bash examples/media/deploy.sh
step ".venv/bin/python examples/media/try_it.py   # upload a clip to media-in; thumbnail and preview appear in media-out"
.venv/bin/python examples/media/try_it.py

step "without an API key the API answers 401: curl -X POST $GATEWAY/v1/functions/hello-event/invoke"
curl -sS -w '\n' -X POST "$GATEWAY/v1/functions/hello-event/invoke"
step "imagefn keys create demo-invoker --scope invoke:hello-event --expires-in 3600   # shown once"
key=$("$IMAGEFN" keys create demo-invoker --scope invoke:hello-event --expires-in 3600 | head -1)
step "with it: curl -H 'Authorization: Bearer ifn_…' -X POST $GATEWAY/v1/functions/hello-event/invoke"
curl -sS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -X POST --data '{"name":"key holder"}' "$GATEWAY/v1/functions/hello-event/invoke"
echo

step "imagefn trigger add hello-event every-2s --cron '*/2 * * * * *' --payload tick   # a timer (seconds first)"
"$IMAGEFN" trigger add hello-event every-2s --cron '*/2 * * * * *' --payload tick
sleep 5
step "imagefn trigger ls hello-event   # fired by the trigger runner that imagefn up runs"
"$IMAGEFN" trigger ls hello-event
"$IMAGEFN" trigger rm hello-event every-2s

step "imagefn ls"
"$IMAGEFN" ls

step "imagefn versions hello-event   # each deploy publishes an immutable version pinned by digest"
"$IMAGEFN" versions hello-event

step "imagefn logs web-app --since 5m   # container output, shipped into Kafka by the worker"
"$IMAGEFN" logs web-app --since 5m

cat <<MSG

==> imagefn is running at $GATEWAY
    platform log:   $STATE/up.log
    CLI:            $IMAGEFN --help   (deploy, invoke [--async], invocation, batch, dlq, logs, ls, versions, alias, rm)
    stop it:        deploy/stop.sh
    open:           $GATEWAY/web/legacy-web/ in a browser (a blog: register, log in, post)
    read next:      docs/user-guide.md, examples/README.md
MSG
