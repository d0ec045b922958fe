"""`usema bench`: the cost of USEMA presets next to MONAI's peer networks on this machine.

Per network and input size: parameters, forward GFLOPs (``torch.utils.flop_counter`` plus the CPU fused
attention ops it does not count), forward latency (median over interleaved rounds, batch 1), peak forward
memory (VmHWM of a fresh subprocess), achieved GFLOP/s, the training-step time (forward + backward + SGD step,
batch 2) and the log-log slope of FLOPs and latency against the pixel count. Ratios are against DynUNet.
Modules: settings (defaults, config), networks, flops, timing, memory, harness (run_benchmark), report, command.
"""
