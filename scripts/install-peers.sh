#!/usr/bin/env bash
# Installs the real DICOM peers the tests talk to, from Debian packages:
# DCMTK (storescu, storescp, echoscu, dsrdump), dicom3tools (dciodvfy) and Orthanc with its
# DICOMweb plugin (STOW-RS, and what OHIF reads), and Chromium, which renders the status page headless in tests/test_web*.py.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  echo "DICOM peers and Chromium already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Orthanc's Debian package may start a system service; tests start their own instances.
(command -v service >/dev/null && $SUDO service orthanc stop >/dev/null 2>&1) || true
echo "installed: ${need[*]}"
