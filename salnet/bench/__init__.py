"""Benchmarks: `python -m salnet.bench NAME [args]`, one module per NAME in this package.

Each benchmark measures salnet against a baseline in the same run and reports ratios (medians of
repeats, the contenders interleaved), printing one JSON object as its last line; `_harness` is
what they share (arguments, repeats, medians, ratios, that line). Speed is never asserted in tests.

The boundary: `data` and `step` are user tooling, run to size hardware before a job: the samples/s
the loader's workers deliver on these CPUs (enough to feed the GPUs? how many workers?), and the
images/s, data wait, MFU and per-rank memory of a training step, DDP or ZeRO, on this machine.
Their options and JSON keys are kept stable, as are those of `backbones` (the README's table of
backbones: parameters, FLOPs, published weights, CPU step cost against resnet50) and `gpu` (the
GPU check, per backbone family). `plan` is user tooling too: a cost model on paper (per-GPU memory by term
under DDP/ZeRO, collectives against compute for a cluster shape); its options and JSON keys are kept
stable. Its parts live in `_plan_memory` and `_plan_comm` (underscored, so they are not listed as
benchmarks). `pack` and `metrics` are development tooling: they
check salnet's own claims (packing runs in parallel and spends its time on validation alone; the
metrics match PySODMetrics, at what speed), as do the baselines and targets inside `data` and
`step`, and may change with the code they check. Nothing outside this package imports it, except
that the metrics tests borrow `metrics.run_reference` as their reference.
"""
