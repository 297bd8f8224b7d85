"""kvfx benchmarks: every speed or memory number is a ratio against a baseline measured in the
same run, and every report names the command that reproduces it.

    kvfx bench e2e --model smollm2-135m --policy snapkv --lengths 2k,4k,8k     (kvfx.bench.e2e)
    kvfx bench kernels                                                          (kvfx.bench.kernels)

How memory and time are measured: kvfx.bench.measure.
"""
