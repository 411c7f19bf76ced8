# rampiped: build, test and install.
PYTHON ?= python3
VENV   ?= .venv
PREFIX ?= /opt/rampiped
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
CONF   ?= /etc/rampipe.conf
# The manual pages (man8, man5 below it) and the bash completion of rampipectl; both are
# searched there by default (man-db's MANDATORY_MANPATH, bash-completion's XDG_DATA_DIRS).
MANDIR ?= /usr/local/share/man
COMPLETIONDIR ?= /usr/local/share/bash-completion/completions
PYTEST_ARGS ?=

# Debian packages the daemon and its tests call: rsync for write-back, acl/attr for the
# manifest oracle, e2fsprogs for loop filesystems, fio for the benchmark, systemd-container and
# debootstrap for the booted-systemd test, sqlite3 for inspection, man-db and groff-base for
# the test that renders the manual pages, prometheus for promtool (the test of the alert
# rules in packaging/prometheus).
DEB_PACKAGES = rsync acl attr e2fsprogs util-linux psmisc fio sqlite3 systemd-container debootstrap logrotate \
	man-db groff-base
# Installed without their recommended packages: prometheus recommends (and would start, on a
# booted systemd) prometheus-node-exporter; the tests need only its promtool.
DEB_PACKAGES_BARE = prometheus

.PHONY: all venv deps deb-deps deb test test-unit lint typecheck man bench install uninstall clean

all: venv

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp

# Installs the Debian packages above when one of their commands is missing (needs root), and
# those `make deb` needs (the booted-systemd test builds the package).
deps: deb-deps
	@missing=""; for c in rsync setfacl getfattr mkfs.ext4 losetup fuser fio sqlite3 systemd-nspawn debootstrap man promtool logrotate; do \
	  command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES) >/dev/null \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES_BARE) >/dev/null; \
	fi

# What `make deb` needs: Debian's own packaging tools (debhelper with dh-python and pybuild), a
# compiler and Python's headers for pyfanotify's C extension, lintian to check the result.
DEB_BUILD_PACKAGES = build-essential fakeroot debhelper dh-python pybuild-plugin-pyproject \
	python3-all-dev python3-setuptools python3-wheel lintian

# Installs them when one is missing (needs root).
deb-deps:
	@missing=""; for p in $(DEB_BUILD_PACKAGES); do \
	  [ "$$(dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null)" = installed ] || \
	    missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	fi

# dist/rampiped_<version>_<arch>.deb, built from the files of the working tree (what git
# tracks or would track) copied to build/deb, so that dpkg-buildpackage writes nothing next to
# the checkout. DEB_VERSION=<version> builds that version instead of debian/changelog's (a
# changelog entry is added to the copy), e.g. to test an upgrade. lintian must report no error.
# DEB_BUILD and DEB_DIST move the build directory and the output (the booted-systemd test
# builds its packages in a directory of its own).
DEB_VERSION ?=
DEB_BUILD ?= build/deb
DEB_DIST ?= dist
deb: deb-deps
	rm -rf $(DEB_BUILD)
	mkdir -p $(DEB_BUILD)/src $(DEB_DIST)
	git ls-files -z --cached --others --exclude-standard | \
	  tar --null --ignore-failed-read -T - -cf - | tar -C $(DEB_BUILD)/src -xf -
	if [ -n "$(DEB_VERSION)" ]; then \
	  { printf 'rampiped (%s) bookworm; urgency=medium\n\n  * Built with DEB_VERSION=%s.\n\n' \
	      "$(DEB_VERSION)" "$(DEB_VERSION)"; \
	    printf ' -- %s  %s\n\n' "$$(sed -n 's/^Maintainer: //p' debian/control)" \
	      "$$(date -R)"; cat debian/changelog; } > $(DEB_BUILD)/src/debian/changelog; \
	fi
	# Debian's python3 and tools only: another python3 first on PATH (pyenv, a venv) would
	# build for an interpreter that the package does not run with.
	cd $(DEB_BUILD)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc
	cp $(DEB_BUILD)/rampiped_*.deb $(DEB_DIST)/
	env PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error $(DEB_BUILD)/*.changes
	@cd $(DEB_BUILD) && ls -1 rampiped_*.deb | sed 's|^|$(DEB_DIST)/|'

# All tiers. System tests need root; they run in a private mount namespace on loop filesystems.
# RAMPIPED_TEST_MNTNS records the namespace's id so that the tests can check where they run.
IN_PRIVATE_NS = unshare -m --propagation private -- sh -c 'RAMPIPED_TEST_MNTNS=$$(readlink /proc/self/ns/mnt) exec "$$@"' in-ns

test: venv deps
	$(IN_PRIVATE_NS) $(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check rampiped tests bench man
	$(VENV)/bin/ruff format --check rampiped tests bench man

typecheck: venv
	$(VENV)/bin/mypy

# The manual pages in man/, from man/src/*.txt and the code they describe (man/build.py). They
# are committed; tests/unit/test_manpages.py fails when they are stale.
man: venv
	$(VENV)/bin/python -m man.build

# The benchmark's charts need matplotlib (the `bench` extra), installed on first use.
$(VENV)/.stamp-bench: $(VENV)/.stamp pyproject.toml
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	touch $@

bench: venv $(VENV)/.stamp-bench deps
	$(IN_PRIVATE_NS) $(VENV)/bin/python -m bench.run

install:
	sh packaging/install.sh install "$(PREFIX)" "$(BINDIR)" "$(UNITDIR)" "$(CONF)" \
	  "$(MANDIR)" "$(COMPLETIONDIR)"

uninstall:
	sh packaging/install.sh uninstall "$(PREFIX)" "$(BINDIR)" "$(UNITDIR)" "$(CONF)" \
	  "$(MANDIR)" "$(COMPLETIONDIR)"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
