# Sourced by this folder's wrappers: real_command NAME prints the next NAME on PATH after
# this folder (Flower's own), leaving PATH as it is (this folder must stay first for the
# processes the wrapped command starts: the approval check is its flwr-clientapp).
site_bin=$(cd "$(dirname "$0")" && pwd)
real_command() {
  (IFS=:; for dir in $PATH; do
    [ "$(cd "$dir" 2>/dev/null && pwd)" = "$site_bin" ] && continue
    [ -x "$dir/$1" ] && { echo "$dir/$1"; exit 0; }
  done; echo "$1: Flower's own $1 is not on PATH" >&2; exit 127)
}
