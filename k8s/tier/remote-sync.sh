#!/bin/sh
# Keep the tier's view of the bucket current: (re)configure the remote, mount the bucket at
# /buckets/$BUCKET if it is not mounted yet (the first run pulls the whole listing), then pull
# what changed since the last run (remote.meta.sync: new objects appear, changed ones are
# fetched again on their next read, deleted ones disappear). Run by the CronJob
# seaweedfs-remote-sync; `kubectl create job --from=cronjob/seaweedfs-remote-sync now` runs it
# at once. The credentials travel on weed shell's stdin, never on a command line, and are not
# printed.
set -eu

weed_shell() {
    weed shell -master="$MASTER" -filer="$FILER"
}

# The origin: REMOTE_TYPE s3 (the default: S3 or IBM COS, keys AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY, REMOTE_ENDPOINT and REMOTE_REGION) or azure (a container: account
# AZURE_STORAGE_ACCOUNT, key AZURE_STORAGE_ACCESS_KEY, REMOTE_ENDPOINT the blob service URL,
# https:// only, empty for https://ACCOUNT.blob.core.windows.net/).
case "${REMOTE_TYPE:-s3}" in
    s3)
        configure=$(printf 'remote.configure -name=origin -type=s3 -s3.access_key=%s -s3.secret_key=%s -s3.endpoint=%s -s3.region=%s -s3.force_path_style=true' \
            "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" "$REMOTE_ENDPOINT" "$REMOTE_REGION")
        ;;
    azure)
        configure=$(printf 'remote.configure -name=origin -type=azure -azure.account_name=%s -azure.account_key=%s' \
            "$AZURE_STORAGE_ACCOUNT" "$AZURE_STORAGE_ACCESS_KEY")
        if [ -n "${REMOTE_ENDPOINT:-}" ]; then
            configure="$configure -azure.endpoint=$REMOTE_ENDPOINT"
        else
            REMOTE_ENDPOINT="https://$AZURE_STORAGE_ACCOUNT.blob.core.windows.net/"
        fi
        ;;
    *)
        echo "REMOTE_TYPE=$REMOTE_TYPE: expected s3 or azure" >&2
        exit 1
        ;;
esac

# remote.configure answers with the configuration, the secret masked; keep it out of the log
# anyway and only say whether it worked.
if ! out=$(printf '%s\n' "$configure" | weed_shell 2>&1) || printf '%s' "$out" | grep -q 'error'; then
    echo "remote.configure failed (check the Secret cachefs-tier-origin and remote.env)" >&2
    exit 1
fi
echo "remote.configure: origin (${REMOTE_TYPE:-s3}) -> $REMOTE_ENDPOINT"

# Runs one weed shell command into $out; on failure prints what went wrong (not the per-object
# lines) and fails.
run() {
    if ! out=$(echo "$1" | weed_shell 2>&1) || printf '%s\n' "$out" | grep -qi 'error'; then
        echo "$1 failed:" >&2
        printf '%s\n' "$out" | grep -v '^/buckets/' >&2
        return 1
    fi
}

run "remote.mount"
case "$out" in
    *"\"/buckets/$BUCKET\""*)
        echo "remote.meta.sync /buckets/$BUCKET"
        run "remote.meta.sync -dir=/buckets/$BUCKET"
        ;;
    *)
        echo "remote.mount /buckets/$BUCKET <- origin/$BUCKET"
        run "remote.mount -dir=/buckets/$BUCKET -remote=origin/$BUCKET"
        ;;
esac
# One line per object would flood the log of a large bucket: count them instead.
printf '%s\n' "$out" | awk '/^\/buckets\/.*\((create|update|delete|skip)\)$/ { n[$NF]++ }
    END { for (k in n) printf "%s %d objects\n", k, n[k] }'
