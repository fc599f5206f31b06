#!/usr/bin/env bash
# Prints a Python >= 3.12 interpreter: python3.12 on PATH, then pyenv's 3.12, then any newer one.
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
candidates=(python3.12)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  candidates+=($(ls -d "$root"/versions/3.12.*/bin/python3 2>/dev/null | sort -V -r))
  candidates+=($(ls -d "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V))
fi
candidates+=(python3.13 python3.14 python3)
for c in "${candidates[@]}"; do
  if command -v "$c" >/dev/null 2>&1 && ok "$c"; then command -v "$c"; exit 0; fi
done
echo "error: no Python >= 3.12 found (looked on PATH and under pyenv)" >&2
exit 1
