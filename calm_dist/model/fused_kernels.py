"""model.fused_kernels=liger: Liger Kernel's Triton RMSNorm, SwiGLU/GeGLU and rotary embedding in the frozen models.

A frozen HF decoder block spends much of a GPU step outside its matmuls: RMSNorm's upcast, power and mean, the
rotary embedding's halves and products, the gated MLP's activation, each an unfused elementwise kernel (the profile
in benchmarks/README.md, P8). Liger Kernel replaces those modules' forwards with fused Triton kernels, in place: the
parameters stay the model's own, so ZeRO-3 partitioning, the states cache and checkpoints see nothing new. Liger
patches the families it knows (its MODEL_TYPE_TO_APPLY_LIGER_FN); any other family is refused, not silently left
unfused. Its cross-entropy patches stay off: the loss is calm_dist's own (model/lm_loss.py, train.loss_kernel).

Liger also patches the family's transformers module (its RMSNorm and MLP classes, its rotary function), so every
model of that family built or run later in the same process uses the Triton kernels too, and those need CUDA
tensors: the trainer's frozen models all live on the GPU, and a process that also runs the family on the CPU
should not use this switch (tests/unit/test_fused_kernels.py undoes the module patch after itself).
"""
from __future__ import annotations

import importlib.util
import inspect


class FusedKernelsError(ValueError):
    """A model these kernels cannot patch."""


def liger_model_types() -> frozenset[str]:
    """The model_type values Liger Kernel patches (imports Liger, and with it Triton)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def check_fused_kernels(kind: str, model_type: str, key: str) -> None:
    """Refuse, before any weight is loaded, a model whose family `kind` cannot patch."""
    if kind == "none":
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise FusedKernelsError("model.fused_kernels=liger needs the liger-kernel package "
                                "(pip install 'calm-dist[fused-loss]', NVIDIA GPUs)")
    if model_type not in liger_model_types():
        raise FusedKernelsError(f"model.fused_kernels=liger: Liger Kernel has no kernels for {key}'s family "
                                f"{model_type!r}; set model.fused_kernels=none")


def apply_fused_kernels(model, kind: str):
    """Patch `model` (a loaded HF causal LM) in place with `kind`'s kernels; returns it."""
    if kind == "none":
        return model
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    check_fused_kernels(kind, model_type, "this model")
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    wanted = dict(rope=True, rms_norm=True, layer_norm=True, swiglu=True, geglu=True, cross_entropy=False,
                  fused_linear_cross_entropy=False)
    accepted = inspect.signature(apply).parameters  # each family's function takes its own subset
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    return model
