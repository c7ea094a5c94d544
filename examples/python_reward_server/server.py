#!/usr/bin/env python3
"""A reward server in Python that r1lab uses like a built-in reward.

It implements r1lab.v1.Reward (proto/r1lab/v1/reward.proto) with grpcio. The message classes come from
protoc (Debian: protobuf-compiler, python3-grpcio, python3-protobuf); no grpcio-tools is needed:

    protoc -I proto --python_out=/tmp/r1lab_pb proto/r1lab/v1/reward.proto
    PYTHONPATH=/tmp/r1lab_pb python3 examples/python_reward_server/server.py --port 50060

then, in a recipe's reward section or a reward config:

    plugins: [{server: "127.0.0.1:50060"}]
    rules: [{name: format, weight: 0.1}, {name: step_count, weight: 0.5}]

Rewards offered:
    step_count   how many reasoning steps (lines or sentences inside <think>) the completion shows,
                 scaled to [0, 1] at --steps steps (a reward people write for "show your work").
    no_apology   0 when the completion apologises, else 1.
"""
import argparse
import json
import re
import sys
import time
from concurrent import futures

import grpc

from r1lab.v1 import reward_pb2

SERVICE = "r1lab.v1.Reward"


def think_text(completion):
    m = re.search(r"<think>(.*?)(</think>|$)", completion, re.S)
    return m.group(1) if m else completion


def step_count(sample, steps):
    text = think_text(sample["completion"])
    parts = [p for p in re.split(r"[\n.;]+", text) if p.strip()]
    return min(1.0, len(parts) / steps), {"step_count.steps": float(len(parts))}


def no_apology(sample, _steps):
    sorry = re.search(r"\b(sorry|apologi[sz]e)\b", sample["completion"], re.I)
    return (0.0 if sorry else 1.0), {}


REWARDS = {"step_count": step_count, "no_apology": no_apology}


class Reward:
    def __init__(self, steps):
        self.steps = steps

    def score(self, request, context):
        fn = REWARDS.get(request.reward)
        if fn is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown reward '{request.reward}' (offered: {', '.join(sorted(REWARDS))})")
        t0 = time.monotonic()
        out = reward_pb2.ScoreResponse()
        for i, s in enumerate(request.samples):
            try:
                sample = {"prompt": s.prompt.decode(), "completion": s.completion.decode(),
                          "reference": s.reference.decode(), "task": s.task,
                          "meta": json.loads(s.meta_json) if s.meta_json else {}}
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sample {i}: {e}")
            score = out.scores.add()
            value, components = fn(sample, self.steps)
            score.value = value
            for k, v in components.items():
                score.components[k] = v
        out.seconds = time.monotonic() - t0
        return out

    def list(self, request, context):
        out = reward_pb2.ListResponse()
        for name in sorted(REWARDS):
            out.rewards.add(name=name, spec_json=json.dumps([{"name": name, "server": "python example"}]))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50060, help="0: any free port (printed on stdout)")
    ap.add_argument("--steps", type=int, default=5, help="step_count: steps for a full reward")
    args = ap.parse_args()
    reward = Reward(args.steps)
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Score": grpc.unary_unary_rpc_method_handler(
            reward.score, request_deserializer=reward_pb2.ScoreRequest.FromString,
            response_serializer=reward_pb2.ScoreResponse.SerializeToString),
        "List": grpc.unary_unary_rpc_method_handler(
            reward.list, request_deserializer=reward_pb2.ListRequest.FromString,
            response_serializer=reward_pb2.ListResponse.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = server.add_insecure_port(f"{host}:{args.port}")
    if port == 0:
        sys.exit(f"cannot listen on {args.host}:{args.port}")
    server.start()
    print(f"reward server on {args.host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
