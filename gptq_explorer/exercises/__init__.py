"""Checks for the lessons' exercises: run a learner's function on a few small cases, compare it with the
engine's own answer, and when it is wrong say which mistake it looks like.

    from gptq_explorer import exercises as ex

    def my_grid(w, bits, sym):
        ...
        return scale, zero

    ex.check_rtn_grid(my_grid)    # a Result: truthy when passed, .message, .mistake (a name, or None)

Every check calls the package's real functions for the right answer (the engine, the checkpoint packer, the
perplexity loop), feeds the learner's function copies of its inputs, and never raises: an exception, a None, a
wrong type or shape is reported in the message. Each knows named wrong answers (`MISTAKES`) and recognises
them by computing what that mistake produces on every case.

| lesson | check | the learner writes |
|---|---|---|
| 1 | check_rtn_grid | fn(w, bits, sym) -> (scale, zero): the per-row min-max grid |
| 2 | check_obs_update | fn(w, Hinv, q, wq) -> delta: the OBS change of a row when w[q] is set to wq |
| 2 | check_obs_loss | fn(w, Hinv, q, wq) -> loss: what that change costs |
| 3 | check_gptq_loop | fn(W, H, bits) -> Q: GPTQ, one symmetric scale per row, 1% damping, natural order |
| 4 | check_bits_per_weight | fn(out_features, in_features, bits, group_size) -> bits per weight |
| 4 | check_dequantize | fn(codes, scales, zeros, g_idx) -> W: the checkpoint's de-quantization |
| 5 | check_act_order_perm | fn(H) -> perm: the desc_act processing order |
| 5 | check_group_index | fn(perm, group_size) -> g_idx: the groups act-order leaves behind |
| 6 | check_hessian | fn(X) -> H: the layer Hessian 2/n X^T X |
| 6 | check_damping | fn(H, damp_percent) -> H + lambda I |
| 7 | check_perplexity | fn(nll) -> perplexity from per-window losses |
| 8 | check_pack_int32 | fn(codes) or fn(codes, bits) -> qweight: 4-bit codes packed into int32 words |
"""

from __future__ import annotations

from . import grid, loop, obs, order, packing, perplexity
from ._core import Result
from .grid import check_bits_per_weight, check_dequantize, check_rtn_grid
from .loop import check_damping, check_gptq_loop, check_hessian
from .obs import check_obs_loss, check_obs_update
from .order import check_act_order_perm, check_group_index
from .packing import check_pack_int32
from .perplexity import check_perplexity

# lesson -> its checks, in the order the lesson asks for them
LESSONS = {
    1: (check_rtn_grid,),
    2: (check_obs_update, check_obs_loss),
    3: (check_gptq_loop,),
    4: (check_bits_per_weight, check_dequantize),
    5: (check_act_order_perm, check_group_index),
    6: (check_hessian, check_damping),
    7: (check_perplexity,),
    8: (check_pack_int32,),
}

CHECKS = {check.__name__: check for checks in LESSONS.values() for check in checks}

# check name -> the names of the mistakes it recognises (besides the generic not_written, raised,
# returned_none, wrong_type, wrong_shape and wrong_values)
MISTAKES = {name: tuple(m.name for m in mistakes)
            for module in (grid, obs, loop, order, perplexity, packing)
            for name, mistakes in module.MISTAKES.items()}

__all__ = ["Result", "LESSONS", "CHECKS", "MISTAKES", *CHECKS]
