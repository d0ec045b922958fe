"""`usema bench`: the cost of USEMA presets next to MONAI's peer networks on this machine.

Per network and input size: parameters, forward GFLOPs (``torch.utils.flop_counter`` plus the CPU fused
attention ops it does not count), forward latency (median over interleaved rounds, batch 1), peak forward
memory (VmHWM of a fresh subprocess), achieved GFLOP/s, the training-step time and images/s (forward + backward +
SGD step, batch 2, at one or more sizes), the voxels/s of `usema infer` on a synthetic NIfTI (2D networks) and the
log-log slope of FLOPs and latency against the pixel count. Ratios are against DynUNet (`usema infer`: BasicUNet).
A run is refused on a loaded machine unless allowed, and then flagged.
Modules: settings (defaults, config), machine (CPU, load check), networks, flops, timing, memory, infer,
harness (run_benchmark), report, command.
"""
