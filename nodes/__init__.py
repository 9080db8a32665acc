"""ComfyUI glue: node classes, the family-neutral runtime and one adapter per model family (:mod:`.unet`, :mod:`.wan`,
:mod:`.hunyuan`, :mod:`.flux`, :mod:`.sd3`, :mod:`.qwen`)."""
from .demo_model import (DemoDiTModelLoader, DemoHunyuanModelLoader, DemoLTXVModelLoader, DemoModelLoader,
                         DemoVideoModelLoader)
from .image_nodes import NODE_CLASS_MAPPINGS as _IMAGE_NODES
from .image_nodes import NODE_DISPLAY_NAME_MAPPINGS as _IMAGE_NAMES

NODE_CLASS_MAPPINGS = {**_IMAGE_NODES, "ITM_DemoModelLoader": DemoModelLoader,
                       "ITM_DemoVideoModelLoader": DemoVideoModelLoader, "ITM_DemoDiTModelLoader": DemoDiTModelLoader,
                       "ITM_DemoLTXVModelLoader": DemoLTXVModelLoader,
                       "ITM_DemoHunyuanModelLoader": DemoHunyuanModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {**_IMAGE_NAMES, "ITM_DemoModelLoader": "Load Demo Model (Fashion-MNIST, ITM)",
                              "ITM_DemoVideoModelLoader": "Load Demo Video Model (moving Fashion-MNIST, WAN, ITM)",
                              "ITM_DemoDiTModelLoader": "Load Demo DiT Model (Fashion-MNIST, Qwen-Image, ITM)",
                              "ITM_DemoLTXVModelLoader":
                                  "Load Demo Video Model (moving Fashion-MNIST, LTX-Video, ITM)",
                              "ITM_DemoHunyuanModelLoader":
                                  "Load Demo Video Model (moving Fashion-MNIST, HunyuanVideo, ITM)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
