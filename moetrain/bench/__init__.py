"""Benchmarks that cannot fool us: every variant alternated iteration by iteration in the same processes.

    stats.py       medians, spread (min..max, IQR), per-iteration ratios, the busy-machine warnings
    interleave.py  the interleaved runner: rotated order, barrier before each variant, slowest rank per iteration
    machine.py     load average, machine description, git commit, glibc malloc tuning
    ranks.py       one benchmark process per rank: device, communication group, autocast, device sync
    moe_layer.py   MoE layer: ours vs the dense-matmul limit vs DeepSpeed-MoE (dropping and dropless-padded)
    pipeline.py    pipelined all-to-all: degrees 1, 2, 4, 8 and auto vs compute alone and communication alone
    netns.py       a network namespace whose loopback is rate-limited (tc tbf), for the pipelining rows
    report.py      docs/benchmarks.md from the suite's JSON
    cli.py         `moetrain-bench`: the fixed suite, one command

Modules import each other relatively, so the harness can be pointed at another checkout of the library
(PYTHONPATH=harness_copy:other_checkout) to measure "before" and "after" with the same harness.
"""
