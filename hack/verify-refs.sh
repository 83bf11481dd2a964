#!/usr/bin/env bash
# Fails when the tree cites something a reader of the repository cannot open: the founding
# design card (its sections live on in docs/design.md), the shared notes directory beside a
# checkout, or a path of one particular machine. Code and docs cite files in the repository
# instead (docs/design.md §n, docs/guarantees.md, hack/node/README.md, …).
#
# Usage: hack/verify-refs.sh [DIR]   (default: the repository root). DIR must be a git work
# tree; tracked and untracked-but-not-ignored files are checked, so bin/ and caches are not.
set -euo pipefail

root=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}

# Written so that this file does not match itself.
patterns=(
  'DESIG[N](\.md|[[:space:]]*§)' # the design card and its sections
  '\.\./shared'                  # the notes directory outside the repository
  '/wor[k]/'                     # the development machines' work directory
  '/hom[e]/[^/[:space:]]+/'       # anyone's home directory
  '/User[s]/[^/[:space:]]+/'
)
regex=$(IFS='|'; echo "${patterns[*]}")

cd "$root"
hits=$(git ls-files -z --cached --others --exclude-standard |
  xargs -0 -r grep -nIE -- "$regex" 2>/dev/null || true)
if [ -n "$hits" ]; then
  printf '%s\n' "$hits"
  echo "verify-refs: the lines above cite a document outside the repository or a machine path;" >&2
  echo "verify-refs: cite a file in the repository instead (docs/design.md §n, docs/*.md, hack/node/README.md)" >&2
  exit 1
fi
