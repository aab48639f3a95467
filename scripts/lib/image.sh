# shellcheck shell=bash
# What EVC's image builds share (sourced by scripts/build-image and scripts/build-edge-images):
# podman from the OS packages, its settings for these machines, the offline base image made
# with mmdebstrap, and a wheelhouse of CPython 3.11 / manylinux wheels that pip installs
# inside the build with --no-index. Nothing here downloads at run time of a container.
# Callers set before sourcing (defaults in brackets):
#   RUNTIME [runc]   the OCI runtime podman uses (crun fails on setrlimit on some machines)
#   PY [python3]     the Python whose pip downloads the wheels (any version)

RUNTIME="${RUNTIME:-${EVC_PODMAN_RUNTIME:-runc}}"
PY="${PY:-${PYTHON:-python3}}"

# img_need_tools NAME: install podman, $RUNTIME and mmdebstrap from the OS packages when missing
# (root or passwordless sudo), else say what to install and exit 2
img_need_tools() {
  local who="$1" need_pkgs=() sudo=""
  command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
  command -v "$RUNTIME" >/dev/null 2>&1 || need_pkgs+=("$RUNTIME")
  command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
  [ ${#need_pkgs[@]} -eq 0 ] && return 0
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "$who: installing ${need_pkgs[*]} from the OS packages"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "$who: please install ${need_pkgs[*]}" >&2
    exit 2
  fi
}

# img_podman_conf: CONTAINERS_CONF, when unset, build/podman/containers.conf (no rlimits set in
# containers: default_ulimits = []); exported
img_podman_conf() {
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    mkdir -p build/podman
    printf '[containers]\ndefault_ulimits = []\n' >build/podman/containers.conf
    CONTAINERS_CONF="$PWD/build/podman/containers.conf"
  fi
  export CONTAINERS_CONF
}

pm() { podman --runtime "$RUNTIME" "$@"; }
# the versions scripts/bootstrap installs (deploy/constraints.txt) go into the wheelhouses too, so
# an image holds what the tests last passed with; EVC_UNPINNED=1: the newest in pyproject's ranges
IMG_PINS=()
[ "${EVC_UNPINNED:-}" != 1 ] && [ -f deploy/constraints.txt ] && IMG_PINS=(-c deploy/constraints.txt)

# img_base NAME BASE: make the base image BASE once (again with EVC_REBUILD_BASE=1): Debian
# bookworm minbase, its python3 (3.11) as `python`, python3-venv, openssh-client, imported
img_base() {
  local who="$1" base="$2" work
  if [ "${EVC_REBUILD_BASE:-}" != 1 ] && pm image exists "$base"; then
    return 0
  fi
  echo "$who: making the base image $base with mmdebstrap (Debian bookworm, Python 3.11)"
  work="$(mktemp -d)"
  # minbase (the packages of priority required: passwd's groupadd/useradd, tzdata, which kombu
  # needs for ZoneInfo("UTC")) as debian:bookworm-slim, under python:3.11-slim-bookworm;
  # python-is-python3: `python` as in the python images; openssh-client is also installed by the
  # final stage's apt step of deploy/Dockerfile, here it spares a mirror-less build.
  mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,python-is-python3,openssh-client,passwd,tzdata,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$work/rootfs.tar"
  # the ENV of an imported image is empty: PATH as in Debian's images, or $PATH in a
  # Dockerfile's ENV would expand to nothing
  pm import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm + python3 (3.11), made by EVC scripts/lib/image.sh"' \
    --change 'CMD ["python"]' \
    "$work/rootfs.tar" "$base" >/dev/null
  rm -rf "$work"
}

# img_download DEST REQ...: wheels of REQ (and their dependencies) for CPython 3.11 /
# manylinux_2_28_x86_64 into DEST (the host's pip and its package index; a build step)
img_download() {
  local dest="$1" pip_cmd=("$PY" -m pip)
  shift
  "$PY" -m pip --version >/dev/null 2>&1 || pip_cmd=(.venv/bin/pip)
  mkdir -p "$dest"
  "${pip_cmd[@]}" download --quiet --disable-pip-version-check --dest "$dest" "${IMG_PINS[@]}" \
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "$@"
}

# img_wheelhouse NAME BASE DEST REQ...: download REQ into DEST, then let BASE's own pip resolve
# against DEST (offline, --dry-run) and download what it still misses: pip evaluates
# environment markers with the Python that runs it, not the target's (a dependency for
# `python_full_version < "3.11.3"` -- bookworm has 3.11.2 -- is missed on a newer host Python)
img_wheelhouse() {
  local who="$1" base="$2" dest="$3" out missing="" key
  shift 3
  # resolved once per base image and requirement list (EVC_REFRESH_WHEELS=1: again, for newer releases)
  key="$({ pm image inspect --format '{{.Id}}' "$base"; printf '%s\n' "$@" "${IMG_PINS[@]}"
    [ ${#IMG_PINS[@]} -eq 0 ] || cat deploy/constraints.txt; } | sha256sum | cut -c1-16)"
  if [ "${EVC_REFRESH_WHEELS:-}" != 1 ] && [ "$(cat "$dest/.resolved" 2>/dev/null)" = "$key" ]; then
    echo "$who: the wheelhouse $dest resolves these $# requirements already"
    return 0
  fi
  rm -f "$dest/.resolved"
  echo "$who: downloading $# requirements (and their dependencies) into $dest"
  img_download "$dest" "$@"
  printf '%s\n' "$@" >"$dest/.requirements.txt"
  for _ in 1 2 3 4 5 6 7 8; do
    if out="$(pm run --rm --network none --volume "$PWD/$dest:/wheels:ro" "$base" sh -c \
      'python -m venv /tmp/v && /tmp/v/bin/pip install --disable-pip-version-check --dry-run \
         --no-index --find-links /wheels -r /wheels/.requirements.txt' 2>&1)"; then
      echo "$key" >"$dest/.resolved"
      return 0
    fi
    missing="$(sed -n 's/^ERROR: No matching distribution found for \([^;]*\).*/\1/p' <<<"$out")"
    if [ -z "$missing" ]; then
      echo "$out" >&2
      echo "$who: the wheelhouse $dest does not resolve in $base (above)" >&2
      exit 1
    fi
    echo "$who: the image's Python also needs: $missing"
    img_download "$dest" "$missing"
  done
  echo "$who: the wheelhouse $dest still misses $missing" >&2
  exit 1
}
