# shellcheck shell=bash
# Shared helpers of the launchers (sourced, not run).

# Single-quote an argument for the shell unless it is plainly safe, so that
# dry runs print commands that can be pasted back into a shell.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
