#!/usr/bin/env bash
# Build the Debian package: the release binary (without the fault-injection
# feature), the `--help` text of every subcommand for /usr/share/doc/agentd,
# then `cargo deb --no-build` with the metadata in Cargo.toml.
#
#   bash packaging/deb/build.sh                     # target/debian/agentd_<version>-1_<arch>.deb
#   bash packaging/deb/build.sh --deb-version 0.1.0+test2 --output DIR/x.deb
#
# Extra arguments go to `cargo deb`. Needs cargo-deb (`cargo install cargo-deb
# --locked`) and dpkg-shlibdeps (package dpkg-dev) for the dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=target
cargo build --locked --release
bin=$target/release/agentd

# The help text: `agentd --help`, then `agentd <command> --help` for every
# command the top-level help lists (so a new subcommand is never missing).
mkdir -p "$target/packaging"
help=$target/packaging/agentd-help.txt
{
  echo "\$ agentd --help"
  "$bin" --help
  "$bin" --help | awk '/^Commands:/ {on = 1; next} on && /^$/ {exit} on {print $1}' |
    while read -r command; do
      [ "$command" = help ] && continue
      echo
      echo "\$ agentd $command --help"
      "$bin" "$command" --help
    done
} >"$help.tmp"
mv "$help.tmp" "$help"

# The project's changelog where Debian policy puts an upstream changelog.
gzip -9n <CHANGELOG.md >"$target/packaging/changelog.gz"

# The same text as a man page (agentd(1)), so `man agentd` works: the help in
# a no-fill block, roff's escape character and control characters escaped.
version=$("$bin" version | awk '{print $2}')
{
  printf '.TH AGENTD 1 "" "agentd %s" "User Commands"\n' "$version"
  printf '.SH NAME\nagentd \\- an agent server native to systemd\n'
  printf '.SH SYNOPSIS\n.B agentd\n.I COMMAND\n[\\fIOPTIONS\\fR]\n'
  printf '.SH DESCRIPTION\nThe output of \\fBagentd \\-\\-help\\fR and of each command'"'"'s \\fB\\-\\-help\\fR.\n'
  printf 'The guides are in /usr/share/doc/agentd/ (operating.md, operators.md, README.md).\n'
  printf '.PP\n.nf\n'
  sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/" -e 's/-/\\-/g' "$help"
  printf '.fi\n.SH SEE ALSO\n.BR systemctl (1),\n.BR journalctl (1)\n'
} >"$target/packaging/agentd.1"

cargo deb --no-build --locked "$@"
