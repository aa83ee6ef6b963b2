"""Compare's pair model on ONNX Runtime GenAI: the base model and one adapter in one batch of two.

The base model's int8 export (`onnx_engine.export`) is copied with each adapted product given
its LoRA path, in float32, and a batched second matrix whose first row is zero:

    y = MatMulNBits(x, W)  +  (x @ A) @ B[row]        B[0] = 0, B[1] = B * scaling

So row 0 of a batch of two decodes as the base model (its graph adds exactly zero) and row 1 as
the adapter on the same int8 weights, which are read once for both rows. That is how PEFT runs
an adapter on a quantized base, and how the torch engine's Compare runs it (`int8.py`). The A and
B matrices of the products one node computes together (q/k/v, gate/up) are stacked, block by
block, so the graph gains three small nodes per int8 product.

    folder = export_pair(model_dir, adapter_dir)   # once; then reused from the model cache

Only plain LoRA on the attention and MLP projections of Llama-style layers maps onto the graph;
anything else (DoRA, LoRA biases, adapted embeddings or output head, saved modules) raises
OnnxUnavailable, and Compare runs on the torch engine instead.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .onnx_engine import OnnxUnavailable, cache_dir, export, export_key

PAIR_VERSION = 1  # bump when the graph changes, so cached pairs are rebuilt
# int8 products of the base export and the projections each computes, in its output's order
PRODUCTS = {"attn/qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp/gate_up_proj": ("gate_proj", "up_proj")}
PROJECTIONS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def lora_matrices(model_dir: Path, adapter_dir: Path) -> tuple[dict, dict]:
    """({(layer, projection): (A [rank, in], B*scaling [out, rank])} of an adapter, as PEFT reads
    it onto the float model (so its scaling, rank and alpha patterns apply);
    {(layer, projection): (in, out)} of every projection, adapted or not)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    config = model.peft_config["default"]
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False) or config.modules_to_save:
        raise OnnxUnavailable("the pair model covers plain LoRA only (no DoRA, LoRA bias or saved modules)")
    found, widths = {}, {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        linear = module.base_layer if isinstance(module, LoraLayer) else module
        if match and match[2] in PROJECTIONS and isinstance(linear, torch.nn.Linear):
            widths[int(match[1]), match[2]] = (linear.in_features, linear.out_features)
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if match is None or match[2] not in PROJECTIONS or not isinstance(module.base_layer, torch.nn.Linear):
            raise OnnxUnavailable(f"the pair model cannot place the adapted module {name}")
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float() * module.scaling["default"]
        found[int(match[1]), match[2]] = (a.numpy(), b.numpy())
    if not found:
        raise OnnxUnavailable("the adapter has no LoRA layers")
    return found, widths


def _product(nodes: dict, layer: int, projection: str) -> tuple[str, tuple[str, ...]]:
    """(node name, projections it computes in order) of the int8 product that holds a projection."""
    for product, members in PRODUCTS.items():
        name = f"/model/layers.{layer}/{product}/MatMul_Q8"
        if projection in members and name in nodes:
            return name, members
    name = f"/model/layers.{layer}/{PROJECTIONS[projection]}/{projection}/MatMul_Q8"
    if name not in nodes:
        raise OnnxUnavailable(f"the base export has no int8 product for layer {layer}'s {projection}")
    return name, (projection,)


def _attribute(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def add_lora_rows(graph, lora: dict, widths: dict) -> int:
    """Give each int8 product that an adapted projection feeds its LoRA path (row 0 zero);
    returns how many products changed."""
    import numpy as np
    from onnx import helper, numpy_helper

    nodes = {n.name: n for n in graph.node}
    by_product = {}
    for layer, projection in lora:
        name, members = _product(nodes, layer, projection)
        by_product[name] = (layer, members)
    added = {}
    for name, (layer, members) in by_product.items():
        node = nodes[name]
        k, n = _attribute(node, "K"), _attribute(node, "N")
        if any((layer, p) not in widths for p in members):
            raise OnnxUnavailable(f"{name}: the model has no projections {members} in layer {layer}")
        if any(widths[layer, p][0] != k for p in members) or sum(widths[layer, p][1] for p in members) != n:
            raise OnnxUnavailable(f"{name}: the export's product is not the projections {members} stacked")
        rank = sum(lora[layer, p][0].shape[0] for p in members if (layer, p) in lora)
        a, b = np.zeros((k, rank), np.float32), np.zeros((2, rank, n), np.float32)
        r = col = 0
        for projection in members:
            if (layer, projection) in lora:  # else its block of outputs stays zero
                pa, pb = lora[layer, projection]
                a[:, r : r + len(pa)] = pa.T
                b[1, r : r + len(pa), col : col + len(pb)] = pb.T
                r += len(pa)
            col += widths[layer, projection][1]
        prefix = name.rsplit("/", 1)[0] + "/lora_pair"
        graph.initializer.extend([numpy_helper.from_array(a, prefix + ".A"), numpy_helper.from_array(b, prefix + ".B")])
        out = node.output[0]
        node.output[0] = out + "/int8"
        added[name] = [helper.make_node("MatMul", [node.input[0], prefix + ".A"], [prefix + "/A"], name=prefix + "/A"),
                       helper.make_node("MatMul", [prefix + "/A", prefix + ".B"], [prefix + "/B"], name=prefix + "/B"),
                       helper.make_node("Add", [out + "/int8", prefix + "/B"], [out], name=prefix + "/Add")]
    ordered = []
    for node in graph.node:
        ordered.append(node)
        ordered.extend(added.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return len(added)


def export_pair(model_dir: Path, adapter_dir: Path, root: Path | None = None) -> Path:
    """The pair model of a base model and an adapter (built once from the base export, then reused)."""
    import onnx

    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    base = export(model_dir, None, root)
    out = Path(root or cache_dir() / "onnx-genai") / f"{export_key(model_dir, adapter_dir)}-pair{PAIR_VERSION}"
    if (out / "genai_config.json").is_file():
        return out
    lora, widths = lora_matrices(model_dir, adapter_dir)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pair-") as tmp:
        built = Path(tmp) / "pair"
        built.mkdir()
        model = onnx.load(str(base / "model.onnx"), load_external_data=False)
        add_lora_rows(model.graph, lora, widths)
        for f in base.iterdir():
            if f.name != "model.onnx":
                try:
                    os.link(f, built / f.name)  # the int8 weights are the base export's, unchanged
                except OSError:
                    shutil.copy2(f, built / f.name)
        onnx.save(model, str(built / "model.onnx"))
        try:
            os.replace(built, out)
        except OSError:  # another process finished the same pair first
            if not (out / "genai_config.json").is_file():
                raise
    return out
