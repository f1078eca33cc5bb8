#!/usr/bin/env bash
# Installs the OHIF viewer (v3) that tests/test_viewers.py serves in front of Orthanc's
# DICOMweb plugin: the built app (dist/) of the npm package @ohif/app, at a pinned version and
# checksum, into var/viewers/ohif-<version>/ (var/ is ignored by git). Idempotent: it returns
# at once when that folder is there. Needs npm (Debian package npm, installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="3.13.2"  # keep in step with OHIF_VERSION in tests/viewers.py
SHA256="b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1"
DEST="var/viewers/ohif-$VERSION"
if [ -f "$DEST/index.html" ]; then
  echo "OHIF $VERSION already installed in $DEST"
  exit 0
fi
if ! command -v npm >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tarball="$work/ohif-app-$VERSION.tgz"
if ! echo "$SHA256  $tarball" | sha256sum --check --status; then
  echo "install-viewer.sh: @ohif/app@$VERSION does not have the pinned SHA-256 $SHA256" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work"
if [ ! -f "$work/package/dist/index.html" ]; then
  echo "install-viewer.sh: @ohif/app@$VERSION holds no built viewer (package/dist/index.html)" >&2
  exit 1
fi
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.part"
mv "$work/package/dist" "$DEST.part"
mv "$DEST.part" "$DEST"
echo "installed OHIF $VERSION in $DEST ($(du -sh "$DEST" | cut -f1))"
