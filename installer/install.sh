#!/usr/bin/env bash
# Install edgegen from an offline archive on a Linux machine with no network: verify, venv, launcher, menu entry.
#
#   install.sh ARCHIVE.tar [PREFIX]     install into PREFIX (default ~/.local), then run `edgegen doctor`
#   install.sh --uninstall [PREFIX]     remove what this script installed there
#
# PYTHON=/usr/bin/python3.11 picks the interpreter (it must match the archive's Python and have `venv`).
# EDGEGEN_SKIP_DOCTOR=1 skips the final check. Nothing here touches the network: pip runs with --no-index
# against the archive's wheelhouse, with every pip setting from the environment or config files ignored.
# Layout: PREFIX/bin/edgegen, PREFIX/lib/edgegen/venv, PREFIX/share/edgegen/{assets,models,engines},
# PREFIX/share/applications/edgegen.desktop, PREFIX/share/icons/hicolor/*/apps/edgegen.{svg,png}.
set -euo pipefail

MARKER_NAME=INSTALLED_BY_EDGEGEN
LAUNCHER_TAG="edgegen offline launcher"

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*" >&2; }

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

absolute_prefix() {
    local p=$1
    case $p in *[\'\"\\\$\`%]* | *$'\n'*) die "PREFIX '$p' holds quotes, \$, %, backslashes or newlines; choose a plainer path" ;; esac
    mkdir -p "$p" || die "cannot create $p"
    (cd "$p" && pwd)
}

refresh_menus() {
    command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$1/share/applications" 2>/dev/null || true
    command -v gtk-update-icon-cache >/dev/null 2>&1 && gtk-update-icon-cache -q -t "$1/share/icons/hicolor" 2>/dev/null || true
}

uninstall() {
    local prefix
    prefix=$(absolute_prefix "${1:-$HOME/.local}")
    local share="$prefix/share/edgegen"
    [ -f "$share/$MARKER_NAME" ] || die "no edgegen installed by install.sh in $prefix (missing $share/$MARKER_NAME)"
    if [ -f "$prefix/bin/edgegen" ] && grep -q "$LAUNCHER_TAG" "$prefix/bin/edgegen"; then
        rm -f "$prefix/bin/edgegen"
    fi
    rm -f "$prefix/share/applications/edgegen.desktop" \
          "$prefix/share/icons/hicolor/scalable/apps/edgegen.svg" \
          "$prefix/share/icons/hicolor/256x256/apps/edgegen.png"
    rm -rf "$prefix/lib/edgegen" "$share"
    refresh_menus "$prefix"
    say "removed edgegen from $prefix (your images, history, settings and audit log in your home folder are kept)"
}

info() { sed -n "s/^$1=//p" BUNDLE_INFO | head -n 1; }

verify() {
    [ -f SHA256SUMS ] && [ -f BUNDLE_INFO ] || die "this is not an edgegen offline archive (no SHA256SUMS/BUNDLE_INFO)"
    [ -z "$(find . -type l -o ! -type f ! -type d)" ] || die "the archive holds links or special files; get a fresh copy"
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum --check --strict --quiet SHA256SUMS || die "checksums do not match: the archive is damaged or was changed; get a fresh copy"
    else
        shasum -a 256 --check --strict --quiet SHA256SUMS || die "checksums do not match: the archive is damaged or was changed; get a fresh copy"
    fi
    # A file that SHA256SUMS does not list (say, an extra wheel pip would pick up) is refused too.
    local listed present
    listed=$(cut -c67- SHA256SUMS | LC_ALL=C sort)
    present=$(find . -type f ! -path ./SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort)
    [ "$listed" = "$present" ] || die "the archive holds files that SHA256SUMS does not list; get a fresh copy"
    say "checksums verified ($(wc -l < SHA256SUMS) files)"
}

pick_python() {
    local want=$1 py=${PYTHON:-}
    if [ -z "$py" ]; then
        for c in "python$want" python3; do
            if command -v "$c" >/dev/null 2>&1; then py=$(command -v "$c"); break; fi
        done
    fi
    [ -n "$py" ] || die "no Python found; install Python $want (with its venv module) or set PYTHON=/path/to/python$want"
    local have
    have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$py does not run"
    [ "$have" = "$want" ] || die "this archive holds wheels for Python $want but $py is Python $have; install python$want or set PYTHON=/path/to/python$want"
    echo "$py"
}

pip_offline() {
    # Ignore every pip setting from the environment and config files: an index, find-links or constraint
    # configured on this machine must not change what gets installed.
    local v
    for v in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
    PIP_CONFIG_FILE=/dev/null PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$VENV/bin/python" -m pip install --no-index --no-cache-dir --find-links "$PWD/wheelhouse" "$@"
}

install_packages() {
    local version extras mode extra_reqs spec
    version=$(info VERSION); extras=$(info EXTRAS); mode=$(info MODE); extra_reqs=$(info EXTRA_REQUIREMENTS)
    case "$extras$extra_reqs" in *[!A-Za-z0-9,._=\<\>~\ -]*) die "BUNDLE_INFO has unexpected characters" ;; esac
    if [ "$mode" = full ]; then
        spec="edgegen==$version"
        [ -z "$extras" ] || spec="edgegen[$extras]==$version"
        # shellcheck disable=SC2086  # extra_reqs is a space-separated list of requirement strings
        pip_offline "$spec" $extra_reqs
    else
        say "reduced archive: installing requirements.txt, then edgegen without its other dependencies"
        pip_offline -r requirements.txt
        pip_offline --no-deps "edgegen==$version"
    fi
}

copy_payload() {
    local share=$1 kind name
    mkdir -p "$share"
    if [ -d assets ]; then rm -rf "$share/assets"; cp -R assets "$share/assets"; fi
    for kind in models engines; do
        [ -d "$kind" ] || continue
        mkdir -p "$share/$kind"
        for name in "$kind"/*/; do
            name=$(basename "$name")
            [ -d "$kind/$name" ] || continue
            rm -rf "${share:?}/$kind/$name"
            cp -R "$kind/$name" "$share/$kind/$name"
        done
    done
    mkdir -p "$share/engines"
}

write_launcher() {
    local prefix=$1
    mkdir -p "$prefix/bin"
    if [ -e "$prefix/bin/edgegen" ] && ! grep -q "$LAUNCHER_TAG" "$prefix/bin/edgegen"; then
        die "$prefix/bin/edgegen exists and is not an edgegen launcher; move it away or choose another PREFIX"
    fi
    cat > "$prefix/bin/edgegen" <<EOF
#!/bin/sh
# $LAUNCHER_TAG (written by install.sh; remove with: install.sh --uninstall '$prefix')
EDGEGEN_ASSETS='$prefix/share/edgegen/assets'
EDGEGEN_ENGINES="\${EDGEGEN_ENGINES:+\$EDGEGEN_ENGINES:}$prefix/share/edgegen/engines"
export EDGEGEN_ASSETS EDGEGEN_ENGINES
# -I: isolated from PYTHONPATH and the user site, so nothing outside this install shadows its packages.
exec '$prefix/lib/edgegen/venv/bin/python' -I -m app.cli "\$@"
EOF
    chmod 755 "$prefix/bin/edgegen"
}

write_desktop_entry() {
    local prefix=$1 icons="$1/share/icons/hicolor"
    mkdir -p "$prefix/share/applications" "$icons/scalable/apps" "$icons/256x256/apps"
    if [ -f assets/icons/edgegen.svg ]; then cp assets/icons/edgegen.svg "$icons/scalable/apps/edgegen.svg"; fi
    if [ -f assets/icons/edgegen.png ]; then cp assets/icons/edgegen.png "$icons/256x256/apps/edgegen.png"; fi
    cat > "$prefix/share/applications/edgegen.desktop" <<EOF
[Desktop Entry]
Type=Application
Name=edgegen
GenericName=Image generator
Comment=Offline image generation with FLUX.2 Klein and SD3.5 engines
Exec="$prefix/bin/edgegen" app
Icon=$icons/256x256/apps/edgegen.png
Terminal=false
Categories=Graphics;2DGraphics;
StartupNotify=true
EOF
    refresh_menus "$prefix"
}

do_install() {
    local archive=$1 prefix top py version
    # A PYTHONPATH holding another edgegen (a checkout) would make pip skip installing this one.
    unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE
    [ -f "$archive" ] || die "archive $archive does not exist"
    archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
    prefix=$(absolute_prefix "${2:-$HOME/.local}")
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/edgegen-install.XXXXXX")
    trap 'rm -rf "$TMP_DIR"' EXIT
    say "unpacking $(basename "$archive")"
    tar -xf "$archive" -C "$TMP_DIR" --no-same-owner --no-same-permissions || die "cannot unpack $archive"
    top=$(find "$TMP_DIR" -mindepth 1 -maxdepth 1)
    [ "$(printf '%s\n' "$top" | wc -l)" -eq 1 ] && [ -d "$top" ] || die "unexpected archive layout; get a fresh copy"
    cd "$top"
    verify
    version=$(info VERSION)
    py=$(pick_python "$(info PYTHON)")
    local dest="$prefix/lib/edgegen"
    VENV="$dest/venv"
    mkdir -p "$dest"
    if [ -d "$VENV" ]; then rm -rf "$VENV.old"; mv "$VENV" "$VENV.old"; fi
    say "creating the environment in $VENV with $py"
    if ! "$py" -m venv "$VENV" || ! install_packages; then
        rm -rf "$VENV"
        if [ -d "$VENV.old" ]; then mv "$VENV.old" "$VENV"; say "the previous installation was kept"; fi
        die "installing the packages failed (see above); on Debian/Ubuntu a missing venv module is: apt install python$(info PYTHON)-venv"
    fi
    rm -rf "$VENV.old"
    copy_payload "$prefix/share/edgegen"
    write_launcher "$prefix"
    write_desktop_entry "$prefix"
    printf 'version=%s\nplatform=%s\ninstalled=%s\n' "$version" "$(info PLATFORM)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        > "$prefix/share/edgegen/$MARKER_NAME"
    say "installed edgegen $version: $prefix/bin/edgegen"
    case ":$PATH:" in *":$prefix/bin:"*) ;; *) say "add $prefix/bin to your PATH to run 'edgegen' by name" ;; esac
    if [ "${EDGEGEN_SKIP_DOCTOR:-0}" != 1 ]; then
        say "checking the installation: edgegen doctor"
        "$prefix/bin/edgegen" doctor || say "edgegen doctor reported problems (above); the installation itself is complete"
    fi
}

case "${1:-}" in
    --uninstall) uninstall "${2:-}" ;;
    -h | --help | "") usage ;;
    -*) die "unknown option $1" ;;
    *) [ $# -le 2 ] || usage; do_install "$1" "${2:-}" ;;
esac
