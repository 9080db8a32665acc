// Importance Token Merging: live preview on the merging node.
//
// While a sampler runs, the pack sends the latest step's pictures (importance map | merge map of the first image)
// as the server message "importance_tome.preview" (nodes/preview.py). This extension gives both merging nodes a
// small preview element (a DOM widget that is never saved in the workflow nor sent with the prompt) and puts each
// message's picture and caption there. Works with the current frontend and the 2024 one (both load this file
// from the pack's WEB_DIRECTORY through the same app / api modules).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "importance_tome.preview";
const NODE_TYPES = new Set(["ITM_ImportanceTokenMerging", "ITM_ImportanceTokenMergingAdvanced"]);
const WIDGET = "itm_live_preview";

function addPreview(node) {
  const box = document.createElement("div");
  box.className = "itm-preview";
  box.style.cssText = "display:flex;flex-direction:column;align-items:center;gap:2px;width:100%;overflow:hidden;";
  const img = document.createElement("img");
  img.className = "itm-preview-image";
  img.alt = "importance map | merge map";
  img.style.cssText = "max-width:100%;max-height:100%;object-fit:contain;image-rendering:pixelated;display:none;";
  const caption = document.createElement("div");
  caption.className = "itm-preview-caption";
  caption.style.cssText = "font-size:10px;opacity:0.8;text-align:center;";
  caption.textContent = "importance | merge map: shown while sampling";
  box.append(img, caption);
  const widget = node.addDOMWidget(WIDGET, "itm_preview", box, {
    serialize: false, // not sent with the prompt
    hideOnZoom: false,
    getMinHeight: () => (img.style.display === "none" ? 24 : 190),
  });
  widget.serialize = false; // not stored in the workflow's widgets_values (node ids and widget order are stable)
  node.itmPreview = { img, caption, widget };
  return node.itmPreview;
}

function findNode(id) {
  // plain ids ("12") and, with subgraphs, execution ids ("5:12": node 12 inside the subgraph of node 5)
  const root = app.rootGraph ?? app.graph;
  let graph = root;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById(Number(part)) ?? graph.getNodeById(part);
    graph = node?.subgraph;
  }
  return node;
}

function show(detail) {
  const node = findNode(detail.node);
  if (!node || !NODE_TYPES.has(node.comfyClass ?? node.type)) return;
  const preview = node.itmPreview ?? addPreview(node);
  const firstImage = preview.img.style.display === "none";
  preview.img.src = detail.image;
  preview.img.style.display = "block";
  preview.img.dataset.step = String(detail.step);
  const map = detail.has_map ? "importance" : "no map (first step, importance = random or cfg 1)";
  preview.caption.textContent =
    `step ${detail.step + 1} · level ${detail.site} · ${detail.kept}/${detail.tokens} tokens · ${map} | merge map`;
  if (firstImage) {  // make room for the picture once
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], 320), Math.max(node.size[1], size[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ImportanceTokenMerging.LivePreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      addPreview(this);
      return result;
    };
  },
  setup() {
    api.addEventListener(EVENT, ({ detail }) => show(detail));
  },
});
