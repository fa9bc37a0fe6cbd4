#!/usr/bin/env bash
# Install fieldlink on Debian or Raspberry Pi OS (x86-64, ARM), as root:
#
#   deploy/install.sh                 # virtualenv in /opt/fieldlink, configs in /etc/fieldlink, systemd units
#   systemctl daemon-reload && systemctl enable --now fieldlink-gateway   # and/or fieldlink-cloud
#
# Options:
#   --root DIR     install under DIR instead of / (packaging, tests); paths inside the
#                  units and configs stay the ones the running system will see
#   --prefix DIR   the virtualenv (default /opt/fieldlink)
#   --no-venv      do not create or update the virtualenv; use the one at --prefix as it is
#   --source DIR   the fieldlink source tree (default: the one holding this script)
#
# What it does, and what running it again does:
#   - the virtualenv: created if missing, then `pip install --upgrade` of this source tree
#     (an upgrade; see deploy/README.md for rollback);
#   - /etc/fieldlink/{gateway,cloud}.toml: copied from configs/ only when missing: an
#     existing config is never overwritten;
#   - /etc/fieldlink/{gateway,cloud}.env (mode 600, for secrets): created empty when missing;
#   - /etc/systemd/system/fieldlink-{gateway,cloud}.service: written when their content changed.
# State lives in /var/lib/fieldlink and /var/lib/fieldlink-cloud, created by systemd at
# the first start (StateDirectory=, owned by the service's dynamic user).
set -euo pipefail

root=""
prefix="/opt/fieldlink"
make_venv=1
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --no-venv) make_venv=0; shift ;;
    --source) source_dir="${2:?--source needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;; esac

etc="$root/etc/fieldlink"
units="$root/etc/systemd/system"
venv="$root$prefix"

say() { printf 'install.sh: %s\n' "$*"; }

# Write $2 to $1 (mode $3) only when the content differs: a second run changes nothing.
put() {
  local target="$1" content="$2" mode="$3"
  if [ -f "$target" ] && [ "$(cat "$target")" = "$content" ]; then
    return
  fi
  printf '%s\n' "$content" > "$target.new"
  chmod "$mode" "$target.new"
  mv "$target.new" "$target"
  say "wrote $target"
}

install -d -m 0755 "$etc" "$units"

if [ "$make_venv" = 1 ]; then
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { echo "install.sh: python3 -m venv failed; apt-get install python3-venv" >&2; exit 1; }
    say "created the virtualenv $venv"
  fi
  "$venv/bin/pip" install --quiet --upgrade "$source_dir"
  say "installed fieldlink $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("fieldlink"))') into $venv"
fi

for program in gateway cloud; do
  config="$etc/$program.toml"
  if [ -e "$config" ]; then
    say "kept $config (an existing config is never overwritten)"
  else
    install -m 0644 "$source_dir/configs/$program.toml" "$config"
    say "wrote $config (a sample: edit it, then: fieldlink-$program check-config $config)"
  fi
  env_file="$etc/$program.env"
  if [ ! -e "$env_file" ]; then
    install -m 0600 /dev/null "$env_file"
    say "wrote $env_file (empty; secrets as NAME=value, readable by root only)"
  fi
  unit="$(sed "s#/opt/fieldlink#$prefix#g" "$source_dir/deploy/systemd/fieldlink-$program.service")"
  put "$units/fieldlink-$program.service" "$unit" 0644
done

say "done. Next: systemctl daemon-reload && systemctl enable --now fieldlink-gateway (or fieldlink-cloud)"
