#!/usr/bin/env bash
# r1lab sandbox run: the JSON verdict of a program, with stdin and an expected output; bad input is refused.
set -euo pipefail
r1lab=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
if ! "$r1lab" sandbox check > "$dir/check.txt"; then
  echo "SKIP: this host cannot isolate programs:"; cat "$dir/check.txt"; exit 0
fi
printf 'import sys\nprint(sum(map(int, sys.stdin.read().split())))\n' > "$dir/sum.py"
printf '1 2 3\n' > "$dir/in.txt"
printf '6\n' > "$dir/six.txt"
printf '7\n' > "$dir/seven.txt"
out=$("$r1lab" sandbox run --lang python --stdin "$dir/in.txt" --expected "$dir/six.txt" "$dir/sum.py")
echo "$out"
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert r["verdict"] == "OK" and r["stdout"] == "6\n" and r["exit_code"] == 0, r
assert set(r) >= {"verdict", "exit_code", "signal", "cpu_ms", "wall_ms", "memory_kb", "stdout", "stderr", "truncated"}
PY
out=$("$r1lab" sandbox run --lang python --stdin "$dir/in.txt" --expected "$dir/seven.txt" "$dir/sum.py")
echo "$out" | grep -q '"verdict":"WA"'
printf 'int main(){for(;;);}\n' > "$dir/spin.c"
out=$("$r1lab" sandbox run --lang c --time-limit-ms 300 "$dir/spin.c")
echo "$out"
echo "$out" | grep -q '"verdict":"TLE"'
# Unknown language and a missing file: usage errors, not verdicts.
if "$r1lab" sandbox run --lang cobol "$dir/sum.py" 2>/dev/null; then echo "accepted --lang cobol"; exit 1; fi
if "$r1lab" sandbox run "$dir/missing.py" 2>/dev/null; then echo "accepted a missing file"; exit 1; fi
echo "sandbox CLI: ok"
