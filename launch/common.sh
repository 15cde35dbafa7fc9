# Sourced by launch/tpu_vm.sh, launch/worker_run.sh and launch/xpk.sh: print a command exactly,
# then run it unless --dry-run (DRY_RUN=1); find and add trainer flags.
# shellcheck shell=bash

# The trainer's exit status after it saved a checkpoint and stopped for a preemption
# (--config.train.preemption_exit_code): 42 is one xpk's JobSet restarts the pods on (42 and
# 127-255 restart, any other non-zero status fails the run, 0 completes it), and a code no
# Python error exits with, so a queued-resource worker's log can tell a preemption from a crash.
# shellcheck disable=SC2034  # Read by the scripts that source this file.
PREEMPTION_EXIT_CODE=42

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

# has_prefix PREFIX WORDS...: whether one of WORDS starts with PREFIX (e.g. a trainer flag the
# user set, which the launcher then leaves alone).
has_prefix() {
  local prefix="$1" word
  shift
  for word in "$@"; do
    if [[ $word == "$prefix"* ]]; then return 0; fi
  done
  return 1
}

# config_value KEY WORDS...: the value of the last --config.KEY=VALUE among WORDS, else empty.
config_value() {
  local flag="--config.$1=" word value=""
  shift
  for word in "$@"; do
    if [[ $word == "$flag"* ]]; then value="${word#"$flag"}"; fi
  done
  echo "$value"
}
