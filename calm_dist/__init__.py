"""calm_dist: CALM composition of frozen LLMs (Bansal et al. 2024), trained at scale with DeepSpeed ZeRO-3."""
from pathlib import Path

__version__ = "0.1.0"
SOURCE_TREE = Path(__file__).resolve().parent.parent  # the checkout an editable install runs from (ds_configs/, git)
__all__ = ["ComposedModel", "ComposedOutput", "CompositionError", "default_layer_pairs", "__version__"]


def __getattr__(name):
    # Lazy: `calm_dist.config` and the CLI's argument errors must not wait for torch and transformers.
    if name in ("ComposedModel", "ComposedOutput", "CompositionError"):
        from calm_dist.model import composition
        return getattr(composition, name)
    if name == "default_layer_pairs":
        from calm_dist.model.layer_pairs import default_layer_pairs

        return default_layer_pairs
    raise AttributeError(f"module 'calm_dist' has no attribute {name!r}")
