#!/usr/bin/env bash
# Real NIfTI and DICOM files written by other tools, for the volume tests
# (tests/io_formats.rs): the small samples the nibabel and pydicom wheels
# ship, downloaded from PyPI once and unpacked into .samples/ (not
# committed). Usage: scripts/fetch-samples.sh [DEST] (default .samples).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-${SAM_UNET_SAMPLES:-.samples}}"
if [ -e "$dest/nibabel/anatomical.nii" ] && [ -e "$dest/pydicom/CT_small.dcm" ]; then
  echo "samples already in $dest"; exit 0
fi
mkdir -p "$dest/wheels"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$dest/wheels" "nibabel==5.3.3" "pydicom==3.0.2"
python3 - "$dest" <<'PY'
import glob, os, sys, zipfile
dest = sys.argv[1]
for wheel, sub, exts in (("nibabel-*.whl", "nibabel", (".nii", ".nii.gz")),
                         ("pydicom-*.whl", "pydicom", (".dcm",))):
    (path,) = glob.glob(os.path.join(dest, "wheels", wheel))
    out = os.path.join(dest, sub)
    os.makedirs(out, exist_ok=True)
    n = 0
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if "/tests/data/" in name or "/data/test_files/" in name:
                if name.endswith(exts):
                    base = os.path.basename(name)
                    # Same names in different folders: keep the folder in the name.
                    if os.path.exists(os.path.join(out, base)):
                        base = name.replace("/", "_")
                    with open(os.path.join(out, base), "wb") as f:
                        f.write(z.read(name))
                    n += 1
    print(f"{n} files from {os.path.basename(path)} in {out}")
PY
