#!/bin/bash
# quiet.sh CMD...: keep the helpers' work (nice-19 processes, chromium) paused while CMD runs, then resume.
# For benchmarking on a shared development machine: helpers and background jobs run under `nice -n 19`;
# this keeps them stopped (SIGSTOP) while a timing runs, so only ratios from a quiet machine are reported.
# QUIET_KEEP=chrom keeps chromium running (for browser benchmarks).
list() { ps -eo pid=,ni=,comm= | awk -v keep="${QUIET_KEEP:-}" '($2==19 || $3 ~ /chrom/) && !(keep != "" && $3 ~ keep) {print $1}'; }
: > /tmp/quiet.pids
( while true; do p=$(list); echo $p >> /tmp/quiet.pids; kill -STOP $p 2>/dev/null; sleep 0.3; done ) &
keeper=$!
trap 'kill $keeper; kill -CONT $(cat /tmp/quiet.pids) 2>/dev/null' EXIT
sleep 1
"$@"
