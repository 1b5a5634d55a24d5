"""Side-by-side benchmarks: mlocompile (eager, fx, inductor), Betty 0.2.1 and torch.func.

``python benchmarks/run.py`` is the entry point; see ``benchmarks/README.md``.

- ``programs``: the losses (written once, shared by Betty and mlocompile), modules and data;
- ``workloads``: the registry of benchmarked programs and their sizes;
- ``engines``: builds a workload as a Betty or an mlocompile ``Engine``;
- ``torchfunc``: the same math written by hand with ``torch.func``;
- ``measure``: what a measuring subprocess does (timing, RSS, FLOPs);
- ``report``: aggregation, ratios, targets and the markdown table.
"""
