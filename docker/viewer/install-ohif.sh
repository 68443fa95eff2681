#!/bin/sh
# Install the OHIF Viewer's static build (npm package @ohif/app, which ships a built dist/) into
# DEST, with one fix applied. Used by docker/viewer/Dockerfile and by scripts/test (which puts it
# in .cache/ohif for tests/test_viewer_ohif.py), so the tests run the very files the image serves.
#
#   docker/viewer/install-ohif.sh DEST            # OHIF_VERSION overrides the pinned version
#
# The fix: @cornerstonejs/dicom-image-loader 5.6 (inside OHIF 3.13) reads VOI LUT Function
# (0028,1056) as an array and keeps its first character ("L" for LINEAR, "S" for SIGMOID), then
# throws "Invalid VOI LUT function": every mammogram that carries the attribute (most vendors'
# do) stays black. Upstream: cornerstonejs/cornerstone3D#2844, OHIF/Viewers#6239 (open). The
# patch takes the first value of a list or the whole string. The script stops if the code it
# patches is not found exactly (a new OHIF version must be checked, not patched blindly).
set -eu
VERSION=${OHIF_VERSION:-3.13.2}
DEST=${1:?usage: install-ohif.sh DEST}
command -v npm >/dev/null 2>&1 || { echo "install-ohif.sh: npm is needed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tar -xzf "$tmp/ohif-app-$VERSION.tgz" -C "$tmp" package/dist
dist="$tmp/package/dist"
bad='voiLutModule\.voiLUTFunction\[0\]'
good='[].concat(voiLutModule.voiLUTFunction)[0]'
files=$(grep -l "$bad" "$dist"/*.js || true)
[ -n "$files" ] || { echo "install-ohif.sh: VOI LUT code not found in @ohif/app@$VERSION" >&2; exit 1; }
for f in $files; do sed -i "s/$bad/$good/g" "$f"; done
if grep -q "$bad" "$dist"/*.js; then echo "install-ohif.sh: patch failed" >&2; exit 1; fi
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$dist" "$DEST"
echo "@ohif/app@$VERSION voi-lut-function-fix" > "$DEST/.mammo-node-ohif"
echo "OHIF $VERSION installed in $DEST (patched: $(echo $files | wc -w) file(s))"
