#!/usr/bin/env bash
# Deploys the media example: one command, safe to run again (the platform must be
# running: deploy/demo.sh starts it, or `.venv/bin/imagefn up`).
#   1. buckets media-in and media-out in the machine's store (deploy/seaweedfs.sh);
#   2. store keys of the function's own, allowed to read and write those two buckets and
#      nothing else (a SeaweedFS identity, made with `weed shell s3.configure`), kept in
#      the credentials file;
#   3. imagefn deploy -f examples/media/function.yaml, with the store's address for
#      functions and those keys given as --env (never written into the spec).
# Then: .venv/bin/python examples/media/try_it.py   (uploads a clip, shows the outputs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/credentials.sh
source deploy/credentials.sh

IN=media-in  # as the trigger in function.yaml says
OUT=media-out
MASTER=${IMAGEFN_SEAWEEDFS_MASTER:-127.0.0.1:9333}
die() { echo "media example: $*" >&2; exit 1; }

endpoint="$(credential IMAGEFN_S3_FUNCTION_ENDPOINT)"
[ -n "$endpoint" ] || die "no IMAGEFN_S3_FUNCTION_ENDPOINT in $CREDENTIALS: run deploy/setup.sh first"
ensure_credential IMAGEFN_MEDIA_S3_ACCESS_KEY "media$(openssl rand -hex 8)"
ensure_credential IMAGEFN_MEDIA_S3_SECRET_KEY "$(new_secret)"
access="$(credential IMAGEFN_MEDIA_S3_ACCESS_KEY)"
secret="$(credential IMAGEFN_MEDIA_S3_SECRET_KEY)"

echo "==> buckets $IN and $OUT"
IMAGEFN_S3_ENDPOINT="$(credential IMAGEFN_S3_ENDPOINT)" \
  IMAGEFN_S3_ACCESS_KEY="$(credential IMAGEFN_S3_ACCESS_KEY)" \
  IMAGEFN_S3_SECRET_KEY="$(credential IMAGEFN_S3_SECRET_KEY)" \
  .venv/bin/python examples/media/try_it.py --make-buckets "$IN" "$OUT"

echo "==> store keys for the function, limited to $IN and $OUT"
# Prints the identity back; kept out of the output since it holds the secret key.
echo "s3.configure -user imagefn-media -access_key $access -secret_key $secret -buckets $IN,$OUT -actions Read,Write,List -apply" \
  | .venv/bin/weed shell -master="$MASTER" >/dev/null 2>&1 \
  || die "weed shell could not add the identity (is SeaweedFS's master on $MASTER?)"

echo "==> imagefn deploy -f examples/media/function.yaml"
.venv/bin/imagefn deploy -f examples/media/function.yaml \
  --env "S3_ENDPOINT=$endpoint" --env "S3_ACCESS_KEY=$access" --env "S3_SECRET_KEY=$secret" \
  --env "OUTPUT_BUCKET=$OUT"
