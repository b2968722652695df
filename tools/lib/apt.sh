# Shared by the test scripts (sourced, not run): Debian packages the tests need, installed
# with apt-get when missing. One `apt-get update` per test run at most: the first install
# runs it and leaves target/.apt-updated; later installs within the hour skip it.
# The sourcing script sets ROOT and defines `fail MESSAGE` (say why, then exit 1).

# need_command COMMAND PACKAGE: make COMMAND available, installing PACKAGE when missing
# (needs root and apt-get; otherwise fail with the command to run).
need_command() {
    local cmd=$1 pkg=$2 stamp=$ROOT/target/.apt-updated
    command -v "$cmd" >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || fail "$cmd not found and not root: install it with 'sudo apt-get install -y --no-install-recommends $pkg'"
    command -v apt-get >/dev/null || fail "$cmd not found and no apt-get to install $pkg"
    mkdir -p "$ROOT/target"
    if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ]; then
        echo "installing $pkg with apt-get (apt-get update first)"
        apt-get update -qq || fail "apt-get update failed"
        touch "$stamp"
    else
        echo "installing $pkg with apt-get"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
        || fail "apt-get install $pkg failed"
    command -v "$cmd" >/dev/null || fail "$pkg installed but $cmd is still missing"
}
