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
DEB_PACKAGES = rsync acl attr e2fsprogs util-linux psmisc fio sqlite3 systemd-container debootstrap \
	man-db groff-base
# Installed without their recommended packages: prometheus recommends (and would start, on a
# booted systemd) prometheus-node-exporter; the tests need only its promtool.
DEB_PACKAGES_BARE = prometheus

.PHONY: all venv deps test test-unit lint typecheck man bench install uninstall clean

all: venv

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp

# Installs the Debian packages above when one of their commands is missing (needs root).
deps:
	@missing=""; for c in rsync setfacl getfattr mkfs.ext4 losetup fuser fio sqlite3 systemd-nspawn debootstrap man promtool; do \
	  command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES) >/dev/null \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES_BARE) >/dev/null; \
	fi

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
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
