#!/usr/bin/env python3
"""Per-kernel profile of decode steps from an Nsight Compute CSV.

  ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum,launch__grid_size \
      --launch-skip N --launch-count M --csv build/bin/rollout --config CONFIG --batches B --new_tokens 48 \
      --profile_new 0 --long_tail 0 > decode.csv
  scripts/ncu-steps.py decode.csv

A step ends with its sampling kernel (sample_kernel); the kernels between two of them are one decode step.
Prints, over the whole steps in the file, each kernel's launches a step, microseconds a step and a call
(ncu runs every kernel alone, so small kernels read a little long), largest first, and the step's total.
"""
import collections
import csv
import re
import signal
import sys


def short(name):
    """The kernel's name without its namespace, template arguments and parameters."""
    name = name.replace("(anonymous namespace)", "")
    depth, out = 0, []
    for ch in name:  # drop <...> nested
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    name = re.sub(r"\(.*$", "", "".join(out)).strip()
    name = name.split("::")[-1]
    return name.split(" ")[-1]


def main(path):
    kernels = collections.OrderedDict()  # ID -> [name, microseconds]
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Name" in r)
    cols = rows[header]
    k_id, k_name = cols.index("ID"), cols.index("Kernel Name")
    k_metric, k_unit, k_value = cols.index("Metric Name"), cols.index("Metric Unit"), cols.index("Metric Value")
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
    for r in rows[header + 1:]:
        if len(r) <= k_value or r[k_metric] != "gpu__time_duration.sum":
            continue
        value = float(r[k_value].replace(",", ""))
        kernels[r[k_id]] = [short(r[k_name]), value * scale.get(r[k_unit], 1.0)]
    steps, current = [], []
    for name, us in kernels.values():
        current.append((name, us))
        if name.startswith("sample_kernel"):
            steps.append(current)
            current = []
    steps = steps[1:]  # the first may have started before the capture window
    if not steps:
        print("no whole decode step (no two sample_kernel launches) in", path)
        return 1
    total = collections.defaultdict(lambda: [0, 0.0])
    for step in steps:
        for name, us in step:
            total[name][0] += 1
            total[name][1] += us
    n = len(steps)
    print(f"{n} decode steps, {sum(len(s) for s in steps) / n:.0f} kernels and "
          f"{sum(us for s in steps for _, us in s) / n:.1f} us a step (kernels alone)\n")
    print("| kernel | calls a step | us a step | us a call |\n|---|---|---|---|")
    for name, (calls, us) in sorted(total.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {calls / n:.1f} | {us / n:.1f} | {us / calls:.1f} |")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    sys.exit(main(sys.argv[1]))
