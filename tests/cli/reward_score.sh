#!/usr/bin/env bash
# r1lab reward score end to end: built-in rules, a YAML rule set, the example C++ plugin and the example
# Python reward server (examples/python_reward_server), all from one reward config, plus bad input.
#   reward_score.sh R1LAB SOURCE_DIR PLUGIN_SO
set -euo pipefail
r1lab=$1 src=$2 plugin=$3
tmp=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

if ! /usr/bin/python3 -c "import grpc, google.protobuf" 2>/dev/null; then
  echo "SKIP: python3-grpcio / python3-protobuf are not installed (scripts/setup.sh installs them)"; exit 77
fi
protoc -I "$src/proto" --python_out="$tmp" "$src/proto/r1lab/v1/reward.proto"
PYTHONPATH="$tmp" /usr/bin/python3 "$src/examples/python_reward_server/server.py" --port 0 --steps 4 > "$tmp/server.out" 2>&1 &
server_pid=$!
for _ in $(seq 100); do grep -q "reward server on" "$tmp/server.out" && break; sleep 0.1; done
port=$(sed -n 's/.*reward server on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/server.out")
[ -n "$port" ] || { echo "the Python reward server did not start:"; cat "$tmp/server.out"; exit 1; }

cat > "$tmp/rules.yaml" <<'YAML'
- name: no_apology_yaml
  checks: [{not_contains: "sorry"}]
YAML
cat > "$tmp/rewards.yaml" <<YAML
plugins:
  - {yaml: rules.yaml}
  - {library: $plugin}
  - {server: "127.0.0.1:$port"}
r1_plus:
  - {name: format, weight: 0.5}
  - {name: math, as: accuracy, gate: format}
  - {name: step_count, weight: 0.5}
  - {name: length_bonus, weight: 0.25, params: {target: 20}}
  - {name: no_apology_yaml, weight: 0.25}
YAML
cat > "$tmp/in.jsonl" <<'JSONL'
{"prompt": "2+2?", "completion": "<think>two plus two.\nis four.\nyes.\nfinal</think><answer>4</answer>", "answer": "4"}
{"prompt": "2+2?", "completion": "sorry, 5", "answer": "4"}
JSONL
"$r1lab" reward score --reward r1_plus --config "$tmp/rewards.yaml" --input "$tmp/in.jsonl" > "$tmp/out.jsonl"
/usr/bin/python3 - "$tmp/out.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 2, rows
a, b = rows
c = a["components"]
# format 0.5 + accuracy 1 + step_count 0.5*1 (4 steps of 4) + length_bonus 0.25*(1 - |33-20|/20) + yaml 0.25
expect = 0.5 + 1 + 0.5 + 0.25 * (1 - abs(33 - 20) / 20) + 0.25
assert abs(a["reward"] - expect) < 1e-9, (a["reward"], expect, c)
assert c["step_count"] == 1.0 and c["step_count.steps"] == 4.0 and c["accuracy"] == 1.0, c
assert b["components"]["gated:accuracy"] == 1.0 and b["components"]["no_apology_yaml"] == 0.0, b
print("ok:", a["reward"], b["reward"])
PY
# Remote rewards are usable alone too, and an unknown name is an error that lists what there is.
"$r1lab" reward score --reward no_apology --config "$tmp/rewards.yaml" --input "$tmp/in.jsonl" | grep -q '"reward":0.0'
if "$r1lab" reward score --reward nope --config "$tmp/rewards.yaml" --input "$tmp/in.jsonl" 2> "$tmp/err"; then
  echo "an unknown reward was accepted"; exit 1
fi
grep -q "unknown reward 'nope'" "$tmp/err"
# A broken line is reported and written back, the others still scored; the exit status says so.
printf '{"completion": "<answer>4</answer>", "answer": "4"}\n{oops\n' > "$tmp/bad.jsonl"
set +e
"$r1lab" reward score --reward math --input "$tmp/bad.jsonl" > "$tmp/bad.out" 2> "$tmp/bad.err"
rc=$?
set -e
[ "$rc" = 1 ] || { echo "exit $rc for a bad line"; exit 1; }
[ "$(wc -l < "$tmp/bad.out")" = 2 ] && grep -q '"reward":1.0' "$tmp/bad.out" && grep -q ':2: not a JSON object' "$tmp/bad.err"
# A config naming a server that is not there fails at once, naming it.
printf 'plugins: [{server: "127.0.0.1:1", timeout_s: 2}]\n' > "$tmp/down.yaml"
if "$r1lab" reward score --reward math --config "$tmp/down.yaml" --input "$tmp/in.jsonl" 2> "$tmp/down.err"; then
  echo "an unreachable server was accepted"; exit 1
fi
grep -q "reward server 127.0.0.1:1" "$tmp/down.err"
echo "reward score: ok"
