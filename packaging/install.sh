#!/bin/sh
# Installs or removes rampiped on a Debian machine.
#
#   sh packaging/install.sh install|uninstall PREFIX BINDIR UNITDIR CONF [MANDIR [COMPLETIONDIR]]
#
# (`sudo make install` / `sudo make uninstall` call it with PREFIX=/opt/rampiped,
# BINDIR=/usr/local/bin, UNITDIR=/etc/systemd/system, CONF=/etc/rampipe.conf,
# MANDIR=/usr/local/share/man, COMPLETIONDIR=/usr/local/share/bash-completion/completions;
# the last two are also the defaults when they are not given.)
#
# install: the Debian packages it needs when missing, a virtualenv in PREFIX with rampiped
# built from this checkout, rampiped and rampipectl linked into BINDIR, the manual pages into
# MANDIR and the bash completion of rampipectl into COMPLETIONDIR (packaging/install-docs.sh),
# the unit in UNITDIR, CONF from rampipe.conf.example unless CONF exists (an edited
# configuration is never overwritten); then, when systemd runs, the service is enabled and
# started (restarted when it already ran, so that the new code runs). Running it again is
# harmless.
#
# uninstall: stops the service, which writes every pinned directory back to disk, then removes
# what install added, except CONF and the Debian packages (other programs may use them).
set -eu

UNIT_NAME=rampiped.service
# Debian packages: python3-venv for the virtualenv; python3-dev, gcc and libc6-dev to build
# pyfanotify's C extension; rsync for writing pins back to disk.
DEB_PACKAGES="python3 python3-venv python3-dev gcc libc6-dev rsync"
# The interpreter those packages belong to, not whichever python3 comes first on PATH.
PYTHON=/usr/bin/python3
# Written into PREFIX so that uninstall removes a directory only when install made it.
MARKER=.installed-by-rampiped-install.sh
# systemd runs generators before it loads any unit, at boot and at each daemon-reload: this one
# orders the units named in static pins' `before:` after rampiped.service (rampiped/generator.py).
GENERATOR=/usr/lib/systemd/system-generators/rampiped-generator
# The line that marks a generator wrapper as ours (written when CONF is not /etc/rampipe.conf).
GENERATOR_MARK="made by rampiped's install.sh"

say() { printf '%s\n' "rampiped: $*"; }
die() {
    printf '%s\n' "rampiped: error: $*" >&2
    exit 1
}

usage() {
    echo "usage: sh packaging/install.sh install|uninstall PREFIX BINDIR UNITDIR CONF [MANDIR [COMPLETIONDIR]]" >&2
    exit 2
}

[ $# -ge 5 ] && [ $# -le 7 ] || usage
ACTION=$1
PREFIX=$2
BINDIR=$3
UNITDIR=$4
CONF=$5
MANDIR=${6:-/usr/local/share/man}
COMPLETIONDIR=${7:-/usr/local/share/bash-completion/completions}
case $ACTION in install | uninstall) ;; *) usage ;; esac
case $PREFIX in
/ | /usr | /usr/local | /opt | /etc | /var | /home) die "PREFIX=$PREFIX: give rampiped a directory of its own, e.g. /opt/rampiped" ;;
esac
for path in "$PREFIX" "$BINDIR" "$UNITDIR" "$CONF" "$MANDIR" "$COMPLETIONDIR"; do
    case $path in
    /?*) ;;
    *) die "'$path' is not an absolute path other than / (PREFIX, BINDIR, UNITDIR, CONF, MANDIR and COMPLETIONDIR must be)" ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    die "$ACTION needs root (it writes to $PREFIX, $BINDIR, $UNITDIR and manages the service): run 'sudo make $ACTION'"
fi

SRC=$(cd "$(dirname "$0")/.." && pwd)
UNIT_SRC=$SRC/packaging/systemd/$UNIT_NAME
UNIT_DST=$UNITDIR/$UNIT_NAME

# The test sd_booted() uses: is systemd the init system of this machine (not only installed)?
systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

install_missing_packages() {
    missing=""
    if command -v dpkg-query >/dev/null 2>&1; then
        for pkg in $DEB_PACKAGES; do
            status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
            [ "$status" = installed ] || missing="$missing $pkg"
        done
    else
        die "not a Debian system (no dpkg-query): install Python 3.11 with venv and headers, gcc and rsync, then run this again"
    fi
    if [ -n "$missing" ]; then
        say "installing Debian packages:$missing"
        apt-get update -qq || die "'apt-get update' failed (exit $?); see its output above"
        # shellcheck disable=SC2086  # the list is meant to split into words
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ||
            die "'apt-get install$missing' failed; see its output above"
    fi
}

make_venv() {
    if [ -e "$PREFIX" ] && [ ! -e "$PREFIX/$MARKER" ] && [ -n "$(ls -A "$PREFIX")" ]; then
        die "$PREFIX exists and was not made by this installer; choose another PREFIX or remove it"
    fi
    # A venv whose interpreter no longer runs (Python upgraded or removed) is made again.
    if [ -x "$PREFIX/bin/python" ] && "$PREFIX/bin/python" -c 'import sys' 2>/dev/null; then
        say "using the virtualenv in $PREFIX"
    else
        say "creating a virtualenv in $PREFIX"
        rm -rf "$PREFIX"
        "$PYTHON" -m venv "$PREFIX" || die "'$PYTHON -m venv $PREFIX' failed (exit $?)"
        : >"$PREFIX/$MARKER"
    fi
    say "installing rampiped from $SRC into $PREFIX (this builds pyfanotify's C extension)"
    # Not editable: the installed daemon must not change when the checkout does. The build
    # happens in a copy so that the checkout gets no build/ or *.egg-info owned by root.
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build \
        --exclude='./*.egg-info' -cf - . | tar -C "$build" -xf -
    # pip reinstalls a project given as a directory even when the version is unchanged, so
    # the checkout's current code is what gets installed. --use-pep517: build wheels (which
    # pip caches) rather than the deprecated `setup.py install` of Debian's pip 23.0.
    "$PREFIX/bin/pip" install --quiet --disable-pip-version-check --no-warn-script-location \
        --use-pep517 "$build" || die "'$PREFIX/bin/pip install $build' failed (exit $?); see pip's output above"
    rm -rf "$build"
    trap - EXIT
}

link_commands() {
    mkdir -p "$BINDIR"
    for cmd in rampiped rampipectl; do
        [ -x "$PREFIX/bin/$cmd" ] || die "$PREFIX/bin/$cmd is missing after pip install"
        if [ -e "$BINDIR/$cmd" ] && [ ! -L "$BINDIR/$cmd" ]; then
            die "$BINDIR/$cmd exists and is not a link made by this installer; remove it first"
        fi
        ln -sfn "$PREFIX/bin/$cmd" "$BINDIR/$cmd"
    done
    say "linked rampiped and rampipectl into $BINDIR"
}

install_generator() {
    [ -x "$PREFIX/bin/rampiped-generator" ] || die "$PREFIX/bin/rampiped-generator is missing after pip install"
    if [ -e "$GENERATOR" ] && [ ! -L "$GENERATOR" ] && ! grep -qF "$GENERATOR_MARK" "$GENERATOR"; then
        die "$GENERATOR exists and was not made by this installer; remove it first"
    fi
    mkdir -p "$(dirname "$GENERATOR")"
    if [ "$CONF" = /etc/rampipe.conf ]; then
        ln -sfn "$PREFIX/bin/rampiped-generator" "$GENERATOR"
    else
        # The generator reads /etc/rampipe.conf unless $RAMPIPED_CONFIG names another file.
        tmp="$GENERATOR.tmp.$$"
        printf '#!/bin/sh\n# %s\nRAMPIPED_CONFIG='"'"'%s'"'"' exec '"'"'%s'"'"' "$@"\n' \
            "$GENERATOR_MARK" "$CONF" "$PREFIX/bin/rampiped-generator" >"$tmp"
        chmod 0755 "$tmp"
        mv -f "$tmp" "$GENERATOR"
    fi
    say "installed $GENERATOR (orders the units in static pins' before: after rampiped)"
}

install_unit() {
    mkdir -p "$UNITDIR"
    # The unit in the repository names the default paths; substitute the ones chosen here.
    tmp="$UNIT_DST.tmp.$$"
    sed -e "s|/usr/local/bin/|$BINDIR/|g" -e "s|/etc/rampipe.conf|$CONF|g" "$UNIT_SRC" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$UNIT_DST"
    say "installed $UNIT_DST"
}

install_config() {
    if [ -e "$CONF" ]; then
        say "keeping the existing $CONF"
    elif [ -f "$SRC/rampipe.conf.example" ]; then
        mkdir -p "$(dirname "$CONF")"
        install -m 0644 "$SRC/rampipe.conf.example" "$CONF"
        say "installed $CONF from rampipe.conf.example: edit it, then 'systemctl reload rampiped'"
    else
        mkdir -p "$(dirname "$CONF")"
        printf '%s\n' "# rampiped configuration (YAML); empty means the built-in defaults." >"$CONF"
        say "installed an empty $CONF (no rampipe.conf.example in $SRC)"
    fi
}

start_service() {
    if ! systemd_running; then
        say "systemd is not running here: not starting the service (start it with 'systemctl enable --now rampiped' once booted with systemd)"
        return 0
    fi
    if ! "$BINDIR/rampipectl" check-config "$CONF"; then
        die "$CONF is invalid (see above): fix it, then 'systemctl enable --now rampiped'"
    fi
    systemctl daemon-reload
    if systemctl is-active --quiet "$UNIT_NAME"; then
        # The old code is still running: restart so the new one runs. Stopping writes every
        # pinned directory back first.
        say "restarting rampiped to run the new version (pinned directories are written back first)"
        systemctl enable --quiet "$UNIT_NAME"
        systemctl restart "$UNIT_NAME" ||
            die "'systemctl restart $UNIT_NAME' failed; see 'journalctl -u rampiped'"
    else
        systemctl enable --quiet --now "$UNIT_NAME" ||
            die "'systemctl enable --now $UNIT_NAME' failed; see 'journalctl -u rampiped'"
    fi
    say "rampiped is enabled and running ('systemctl status rampiped')"
}

do_install() {
    [ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing: run this from a rampiped checkout"
    install_missing_packages
    make_venv
    link_commands
    sh "$SRC/packaging/install-docs.sh" install "$MANDIR" "$COMPLETIONDIR"
    install_generator
    install_config
    install_unit
    start_service
}

stop_service() {
    if systemd_running; then
        if [ -e "$UNIT_DST" ] || systemctl cat "$UNIT_NAME" >/dev/null 2>&1; then
            say "stopping rampiped (it writes every pinned directory back to disk first)"
            systemctl disable --quiet --now "$UNIT_NAME" ||
                die "'systemctl disable --now $UNIT_NAME' failed; nothing was removed. See 'journalctl -u rampiped'"
            if systemctl is-failed --quiet "$UNIT_NAME"; then
                die "rampiped did not stop cleanly: pinned data may still be in RAM (see 'journalctl -u rampiped'). Nothing was removed; 'systemctl start rampiped' adopts the pins again"
            fi
        fi
    elif [ -x "$BINDIR/rampipectl" ]; then
        # Exit status 3: no daemon answers on the control socket.
        rc=0
        "$BINDIR/rampipectl" status >/dev/null 2>&1 || rc=$?
        if [ "$rc" -ne 3 ]; then
            die "rampiped may still be running ('rampipectl status' exit $rc): stop it (SIGTERM writes everything back) and run this again"
        fi
    fi
    # A stop that left RAM layers mounted would lose them with the code that can write them
    # back: refuse to go on. (/run/rampiped is the default runtime_dir.)
    if grep -q '/run/rampiped/' /proc/self/mountinfo 2>/dev/null; then
        die "mounts below /run/rampiped remain after the stop (see 'findmnt'); nothing was removed"
    fi
}

do_uninstall() {
    stop_service
    if [ -e "$UNIT_DST" ]; then
        rm -f "$UNIT_DST"
        say "removed $UNIT_DST"
    fi
    # (before the daemon-reload below, which then drops the generator's ordering drop-ins)
    if { [ -L "$GENERATOR" ] && case $(readlink "$GENERATOR") in "$PREFIX"/*) true ;; *) false ;; esac; } ||
        { [ -f "$GENERATOR" ] && grep -qF "$GENERATOR_MARK" "$GENERATOR"; }; then
        rm -f "$GENERATOR"
        say "removed $GENERATOR"
    fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
    fi
    sh "$SRC/packaging/install-docs.sh" uninstall "$MANDIR" "$COMPLETIONDIR"
    for cmd in rampiped rampipectl; do
        if [ -L "$BINDIR/$cmd" ]; then
            case $(readlink "$BINDIR/$cmd") in
            "$PREFIX"/*)
                rm -f "$BINDIR/$cmd"
                say "removed $BINDIR/$cmd"
                ;;
            *) say "leaving $BINDIR/$cmd: it does not point into $PREFIX" ;;
            esac
        fi
    done
    if [ -e "$PREFIX/$MARKER" ]; then
        rm -rf "$PREFIX"
        say "removed $PREFIX"
    elif [ -e "$PREFIX" ]; then
        say "leaving $PREFIX: this installer did not make it"
    fi
    if [ -e "$CONF" ]; then
        say "kept your configuration $CONF (remove it by hand if you no longer need it)"
    fi
}

case $ACTION in
install) do_install ;;
uninstall) do_uninstall ;;
esac
