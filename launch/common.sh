# shellcheck shell=bash
# Sourced by the launch scripts: showing and running commands, flag parsing, usage errors.
#
# Every command a script runs goes through `run` (or `query` when its output decides what
# happens next), so `--dry-run` prints exactly the commands a real run would execute.

if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
  echo "launch/: needs bash >= 4.4, not $BASH_VERSION (macOS: brew install bash)" >&2
  exit 1
fi

DRY_RUN=0

# fd 3: where commands are shown. Under --dry-run the plan is the output, so it is stdout, even
# from inside $(...); otherwise a `+ command` log line on stderr, as `set -x` would print.
exec 3>&1

# The command as one shell line: plain words as they are, anything else in single quotes
# (only the value of a `--flag=value`).
quoted() {
  local words=() word flag
  for word in "$@"; do
    flag=''
    if [[ $word =~ ^--[A-Za-z0-9_.-]+= ]]; then
      flag=${BASH_REMATCH[0]}
      word=${word#"$flag"}
    fi
    if [[ ! ($word =~ ^[A-Za-z0-9_./:=,@%+^-]+$ || (-n $flag && -z $word)) ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    words+=("$flag$word")
  done
  echo "${words[*]}"
}

show() {
  if (( DRY_RUN )); then quoted "$@" >&3; else echo "+ $(quoted "$@")" >&2; fi
}

# Show a command, then run it unless --dry-run.
run() {
  show "$@"
  if (( ! DRY_RUN )); then "$@"; fi
}

# `query ANSWER COMMAND...`: show the command and print its output; under --dry-run print
# ANSWER instead, the answer that lets the dry run go on along the usual path.
query() {
  local answer=$1
  shift
  show "$@"
  if (( DRY_RUN )); then echo "$answer"; else "$@"; fi
}

note() { echo "$(basename "$0"): $*" >&2; }

# The comment block at the top of the script, from its second line to the first blank one.
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;s/^#$//;p;}' "$0"; }

usage_error() {
  note "$*"
  echo >&2
  usage >&2
  exit 2
}

# `join_values "--a --b" ARGS...` sets ARGS to the arguments with each `--a VALUE` (for the
# listed flags, and --config / --config.*) joined as `--a=VALUE`, so that a parser need only
# match `--a=*`. A listed flag with no value after it is a usage error.
join_values() {
  local takes=" $1 --config "
  shift
  ARGS=()
  while (( $# )); do
    if [[ $takes == *" $1 "* || ($1 == --config.* && $1 != *=*) ]]; then
      (( $# >= 2 )) || usage_error "$1 needs a value: $1=VALUE"
      ARGS+=("$1=$2")
      shift 2
    else
      ARGS+=("$1")
      shift
    fi
  done
}
