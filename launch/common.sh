# Sourced by launch/tpu_vm.sh and launch/xpk.sh: print a command exactly, then run it unless
# --dry-run (DRY_RUN=1).
# shellcheck shell=bash

# One word as a shell reads it back: bare when safe, else single-quoted ('--flag=' stays bare
# in front of a quoted value, so `--command='cd ~/lidit_jax && ...'` reads naturally).
quote_word() {
  local word="$1" prefix=""
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
    return
  fi
  if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
}

# Prints the command on one line (pasteable) and runs it unless DRY_RUN=1.
run() {
  local word line=""
  for word in "$@"; do
    line+="${line:+ }$(quote_word "$word")"
  done
  echo "$line"
  if [ "${DRY_RUN:-0}" = 0 ]; then "$@"; fi
}
