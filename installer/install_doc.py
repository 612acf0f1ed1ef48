"""INSTALL.md for an offline archive: what is inside and how to install, check and remove it, with its own values."""

from __future__ import annotations

from string import Template

TEXT = Template("""# edgegen $VERSION — offline installer ($PLATFORM)

This archive installs edgegen on a machine with **no network**: every Python package it needs is in
`wheelhouse/`, and nothing is downloaded during installation or use.

## Contents
- `wheelhouse/` — edgegen's wheel and its dependencies ($MODE_TEXT), for Python $PYTHON
- `requirements.txt` — the exact versions in the wheelhouse
- `assets/` — the demo model, its reference images and the icon
- `models/` — model folders shipped with it: $MODELS
- `engines/` — engine bundles shipped with it: $BUNDLES
- `SHA256SUMS` — the checksum of every file; the installers refuse an archive that does not match
- `install.sh` (Linux), `install.ps1` (Windows, untested)

## Requirements
Python $PYTHON with its `venv` module (Debian/Ubuntu: `apt install python$PYTHON-venv`), `tar`, `sha256sum`.
$GPU_TEXT

## Install (Linux)
```
tar -xf $ARCHIVE $TOP/install.sh --strip-components=1     # or use the install.sh shipped beside the archive
./install.sh $ARCHIVE            # into ~/.local; or: ./install.sh $ARCHIVE /opt/edgegen
PYTHON=/usr/bin/python$PYTHON ./install.sh $ARCHIVE        # to choose the interpreter
```
It verifies `SHA256SUMS`, creates `PREFIX/lib/edgegen/venv`, installs from the wheelhouse with
`pip install --no-index`, copies assets, models and bundles to `PREFIX/share/edgegen/`, writes the launcher
`PREFIX/bin/edgegen` and a menu entry with its icon, then runs `edgegen doctor`.

## Install (Windows, untested)
```
powershell -ExecutionPolicy Bypass -File install.ps1 -Archive $ARCHIVE
```

## Check
```
edgegen doctor          # GPU, CUDA/TensorRT versions, which bundles can run here and how to fix those that cannot
edgegen selftest        # the demo model through every backend here, compared with the reference images
```

## Remove
```
./install.sh --uninstall [PREFIX]
```
Images, history, settings and the audit log live in your home folder and are kept.
""")


def install_md(info: dict, top: str) -> str:
    mode = "complete" if info["MODE"] == "full" else "a REDUCED set chosen at build time: edgegen's other " \
        "dependencies must already be available"
    gpu = ("NVIDIA driver for the GPU; CUDA libraries come with the wheels." if info["TARGET"] == "cuda"
           else "No GPU needed (CPU build; TensorRT-RTX engines can still be built for RTX GPUs).")
    return TEXT.substitute(
        VERSION=info["VERSION"], PLATFORM=info["PLATFORM"], PYTHON=info["PYTHON"], MODE_TEXT=mode,
        MODELS=info["MODELS"] or "none", BUNDLES=info["BUNDLES"] or "none", GPU_TEXT=gpu,
        ARCHIVE=f"{top}.tar", TOP=top,
    )
