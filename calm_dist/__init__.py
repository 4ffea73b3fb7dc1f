"""calm_dist: CALM composition of frozen LLMs (Bansal et al. 2024), trained at scale with DeepSpeed ZeRO-3."""
from .composition import ComposedModel, ComposedOutput, CompositionError
from .mapping import default_layer_pairs

__version__ = "0.1.0"
__all__ = ["ComposedModel", "ComposedOutput", "CompositionError", "default_layer_pairs", "__version__"]
