"""ComfyUI glue: node classes and one adapter per model family (only :mod:`.unet` so far)."""
from .image_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
