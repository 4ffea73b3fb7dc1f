"""FLOPs of a call as torch's FlopCounterMode counts them, the CPU's fused attention included.

FlopCounterMode knows the CUDA SDPA kernels only; the CPU flash kernel is counted the same way here (forward:
QK^T + PV; backward: 5 bmm-sized products, as for the CUDA flash / efficient kernels), so the cost model's
formulas can be checked on CPU runs.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten
CPU_SDPA = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
}


def counted(fn) -> int:
    """FLOPs of `fn()` (forward, and backward if it runs one)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        fn()
    return fc.get_total_flops()
