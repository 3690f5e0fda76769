#!/bin/sh
# cachefs-entrypoint: start cachefs in a container (or under systemd) the way an operator expects.
#
#   cachefs-entrypoint [mount] [CACHEFS-MOUNT-OPTIONS...]   mount in the foreground (the default)
#   cachefs-entrypoint unmount                              unmount the configured mountpoint, if mounted
#   cachefs-entrypoint COMMAND [ARGS...]                    run COMMAND instead (e.g. cachefs status ...)
#
# Mount mode:
#   1. finds SOURCE and MOUNTPOINT: $CACHEFS_SOURCE / $CACHEFS_MOUNTPOINT, else the `source` /
#      `mountpoint` keys of the config file $CACHEFS_CONFIG (same precedence as cachefs itself);
#   2. checks that /dev/fuse is there (the container must be privileged, or have /dev/fuse and
#      CAP_SYS_ADMIN);
#   3. unmounts whatever is still mounted on MOUNTPOINT -- after a crash or a container restart that
#      is a stale FUSE mount ("Transport endpoint is not connected") -- with `cachefs unmount`;
#   4. creates MOUNTPOINT;
#   5. execs `cachefs mount SOURCE MOUNTPOINT --foreground [OPTIONS...]`, so cachefs replaces this
#      shell and receives SIGTERM itself (it unmounts cleanly on SIGTERM).
#
# Exit codes follow cachefs: 2 = required setting missing or invalid, 4 = mountpoint problem;
# after the exec they are cachefs's own.
#
# POSIX sh only (the image has dash); shellcheck-clean.
set -eu

PROG=cachefs-entrypoint

say() {
    printf '%s: %s\n' "$PROG" "$*" >&2
}

die() {
    code=$1
    shift
    say "error: $*"
    exit "$code"
}

# Print the string value of top-level key $1 of TOML file $2 (empty if unset). Uses the Python
# that runs cachefs, which has tomllib (Python >= 3.11), rather than parsing TOML in sh.
toml_get() {
    "$(cachefs_python)" - "$1" "$2" <<'EOF'
import sys, tomllib
key, path = sys.argv[1], sys.argv[2]
try:
    with open(path, "rb") as f:
        value = tomllib.load(f).get(key, "")
except (OSError, tomllib.TOMLDecodeError) as exc:
    sys.exit(f"cannot read config file {path}: {exc}")
if not isinstance(value, str):
    sys.exit(f"config file {path}: {key} must be a string")
print(value)
EOF
}

# The interpreter named in the `cachefs` script's #! line (pip writes an absolute path), so the
# entrypoint works whatever `python3` is first on PATH; falls back to python3.
cachefs_python() {
    script=$(command -v cachefs 2>/dev/null || true)
    if [ -n "$script" ] && [ -r "$script" ]; then
        IFS= read -r shebang <"$script" || true
        interp=${shebang#\#!}
        case $shebang in
            '#!/'*python*) if [ -x "$interp" ]; then printf '%s\n' "$interp"; return; fi ;;
            *) ;;
        esac
    fi
    printf '%s\n' python3
}

# Is $1 (an absolute path without a trailing slash) a mount point right now? Reads the mount table
# rather than stat()ing the path, because stat fails on a stale FUSE mount. mountinfo escapes
# space, tab, newline and backslash as octal; ENVIRON (unlike awk -v) keeps backslashes as they are.
is_mounted() {
    escaped=$(printf '%s' "$1" | sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/	/\\011/g')
    MOUNT_PATH=$escaped awk '$5 == ENVIRON["MOUNT_PATH"] { found = 1 } END { exit !found }' \
        /proc/self/mountinfo
}

# Settle SOURCE and MOUNTPOINT (environment first, then the config file) into $source / $mountpoint.
resolve_settings() {
    config=${CACHEFS_CONFIG:-}
    if [ -n "$config" ] && [ ! -r "$config" ]; then
        die 2 "config file $config (from CACHEFS_CONFIG) does not exist or is not readable"
    fi
    source=${CACHEFS_SOURCE:-}
    mountpoint=${CACHEFS_MOUNTPOINT:-}
    if [ -z "$source" ] && [ -n "$config" ]; then
        source=$(toml_get source "$config") || exit 2
    fi
    if [ -z "$mountpoint" ] && [ -n "$config" ]; then
        mountpoint=$(toml_get mountpoint "$config") || exit 2
    fi
    [ -n "$source" ] || [ "$1" = unmount ] ||
        die 2 "no source: set CACHEFS_SOURCE (e.g. s3://bucket/prefix) or 'source' in ${config:-a config file named by CACHEFS_CONFIG}"
    [ -n "$mountpoint" ] ||
        die 2 "no mountpoint: set CACHEFS_MOUNTPOINT or 'mountpoint' in ${config:-a config file named by CACHEFS_CONFIG}"

    case $mountpoint in
        /*) ;;
        *) die 2 "mountpoint must be an absolute path, not '$mountpoint'" ;;
    esac
    # Drop trailing slashes, then resolve symlinks in the parent (not in the mountpoint itself,
    # which may be a stale mount that cannot be stat()ed) so the path matches the mount table.
    while [ "$mountpoint" != / ] && [ "${mountpoint%/}" != "$mountpoint" ]; do
        mountpoint=${mountpoint%/}
    done
    [ "$mountpoint" != / ] || die 2 "refusing to mount over /"
    parent=$(dirname -- "$mountpoint")
    if [ -d "$parent" ]; then
        parent=$(cd -P -- "$parent" && pwd -P)
        mountpoint=${parent%/}/$(basename -- "$mountpoint")
    fi
}

# Unmount whatever is on the mountpoint, saying why ($1). Before a mount that is a stale mount
# from a crashed or restarted daemon, or a live one that nothing else may own (cachefs refuses
# to mount over a mount). `cachefs unmount` handles both.
clean_mountpoint() {
    if is_mounted "$mountpoint"; then
        say "$1"
        cachefs unmount "$mountpoint" || die 4 "could not unmount $mountpoint"
    fi
}

mode=mount
case ${1:-} in
    '' | -*) ;;
    mount) shift ;;
    unmount) mode=unmount; shift ;;
    *) exec "$@" ;;
esac

command -v cachefs >/dev/null 2>&1 || die 1 "cachefs is not on PATH ($PATH)"
resolve_settings "$mode"

if [ "$mode" = unmount ]; then
    clean_mountpoint "unmounting $mountpoint"
    exit 0
fi

if [ ! -c /dev/fuse ]; then
    die 4 "/dev/fuse is missing: run the container privileged (Kubernetes: securityContext.privileged: true; docker: --privileged, or --device /dev/fuse --cap-add SYS_ADMIN)"
fi
clean_mountpoint "$mountpoint is still mounted (left by an earlier run); unmounting it"
if [ -e "$mountpoint" ] && [ ! -d "$mountpoint" ]; then
    die 4 "mountpoint $mountpoint exists and is not a directory"
fi
mkdir -p -- "$mountpoint" || die 4 "cannot create mountpoint $mountpoint"

# Never log a query string: a pasted https:// Azure URL may carry a SAS token.
say "mounting ${source%%\?*} on $mountpoint"
exec cachefs mount "$source" "$mountpoint" --foreground "$@"
