"""Importance Token Merging for ComfyUI: merge similar tokens before self-attention, keep the important ones."""
try:  # inside ComfyUI; importing the package elsewhere (e.g. merging/ tests) must not need it
    import comfy.model_patcher  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # the live preview on the merging node (web/importance_tome.js)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
