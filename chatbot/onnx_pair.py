"""Compare's pair model on ONNX Runtime: the base model and one adapter in one batch of two.

The base model's int8 export (`onnx_engine.export`) is copied with each adapted product given
its LoRA path in float32, scaled per row by a graph input:

    y = MatMulNBits(x, W)  +  ((x @ A) * lora_scale[row]) @ B       lora_scale = [0, 1]

So row 0 of a batch of two decodes as the base model (its LoRA path adds exactly zero) and row 1
as the adapter on the same int8 weights, which are read once for both rows. That is how PEFT
runs an adapter on a quantized base, and how the torch engine's Compare runs it (`int8.py`). The
A and B matrices of the products one node computes together (q/k/v, gate/up) are stacked, block
by block, so the graph gains four small nodes per int8 product.

`PairDecoder` runs it with onnxruntime itself rather than onnxruntime-genai, whose batches read
their prompt once and cannot keep the system prompt: here both rows' keys and values live in
buffers the decoder owns, the system prompt is kept in them between replies, and each row's own
prompt is read as a batch of one into its half (the attention kernel takes several new tokens
after a kept part only in a batch of one). Sampling is transformers' own logits processors, as
on the torch engine (`decoder._processors`), with top-p drawn among the most likely tokens
rather than over a sorted vocabulary (`nucleus_draw`).

    decoder = PairDecoder(export_pair(model_dir, adapter_dir))   # exported once, then reused

Only plain LoRA on the attention and MLP projections of Llama-style layers maps onto the graph;
anything else (DoRA, LoRA biases, adapted embeddings or output head, saved modules) raises
OnnxUnavailable, and Compare runs on the torch engine instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .onnx_engine import SPIN_US, OnnxUnavailable, cache_dir, export, export_key, publish

PAIR_VERSION = 2  # bump when the graph changes, so cached pairs are rebuilt
# int8 products of the base export and the projections each computes, in its output's order
PRODUCTS = {"attn/qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp/gate_up_proj": ("gate_proj", "up_proj")}
PROJECTIONS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SCALE = "lora_scale"  # graph input [rows, 1, 1]: 0 runs a row as the base model, 1 as the adapter
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
    """Give each int8 product that an adapted projection feeds its LoRA path, scaled per row by
    the graph input SCALE; returns how many products changed."""
    import numpy as np
    import onnx
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
        a, b = np.zeros((k, rank), np.float32), np.zeros((rank, n), np.float32)
        r = col = 0
        for projection in members:
            if (layer, projection) in lora:  # else its block of outputs stays zero
                pa, pb = lora[layer, projection]
                a[:, r : r + len(pa)] = pa.T
                b[r : r + len(pa), col : col + len(pb)] = pb.T
                r += len(pa)
            col += widths[layer, projection][1]
        prefix = name.rsplit("/", 1)[0] + "/lora_pair"
        graph.initializer.extend([numpy_helper.from_array(a, prefix + ".A"), numpy_helper.from_array(b, prefix + ".B")])
        out = node.output[0]
        node.output[0] = out + "/int8"
        added[name] = [helper.make_node("MatMul", [node.input[0], prefix + ".A"], [prefix + "/A"], name=prefix + "/A"),
                       helper.make_node("Mul", [prefix + "/A", SCALE], [prefix + "/scaled"], name=prefix + "/Scale"),
                       helper.make_node("MatMul", [prefix + "/scaled", prefix + ".B"], [prefix + "/B"], name=prefix + "/B"),
                       helper.make_node("Add", [out + "/int8", prefix + "/B"], [out], name=prefix + "/Add")]
    graph.input.append(helper.make_tensor_value_info(SCALE, onnx.TensorProto.FLOAT, ["batch_size", 1, 1]))
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
        publish(built, out)
    return out


def session(folder: Path, threads: int):
    """An onnxruntime CPU session of an exported model's graph, its threads spinning as the chat
    engine's do (onnx_engine.SPIN_US)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    return ort.InferenceSession(str(Path(folder) / "model.onnx"), options, providers=["CPUExecutionProvider"])


class PairDecoder:
    """Decodes a pair model's two rows (0: base, 1: adapter) with onnxruntime, keeping the system
    prompt's keys and values of both rows between replies and nothing of a conversation."""

    BLOCK = 256  # buffers grow in steps of this many positions

    def __init__(self, folder: Path, threads: int = 1):
        self.session = session(folder, threads)
        decoder = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        self.layers = decoder["num_hidden_layers"]
        self.shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self.capacity, self.kept = 0, []  # positions in the buffers; the prefix tokens they hold

    def _allocate(self, length: int) -> None:
        """Key/value buffers [2, heads, length, dim] per layer, and bindings that read and write
        them in place: one for both rows, one per row (a batch of one, in that row's half)."""
        import numpy as np

        self.capacity = -(-length // self.BLOCK) * self.BLOCK
        self.kept = []
        shape = (2, self.shape[0], self.capacity, self.shape[1])
        self.buffers = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.layers)]
        self.bindings = [self._bind(slice(0, 2)), self._bind(slice(0, 1)), self._bind(slice(1, 2))]

    def _bind(self, rows: slice):
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output("logits")  # first: outputs come back in binding order
        for i, (keys, values) in enumerate(self.buffers):
            for name, buffer in (("key", keys), ("value", values)):
                value = ort.OrtValue.ortvalue_from_numpy(buffer[rows])  # a view: the run writes the buffer
                binding.bind_ortvalue_input(f"past_key_values.{i}.{name}", value)
                binding.bind_ortvalue_output(f"present.{i}.{name}", value)
        return binding

    def _run(self, which: int, tokens: list[list[int]], total: int, scale: list[float]):
        """Logits of the last position per row after `tokens`, with `total` positions in all."""
        import numpy as np

        binding = self.bindings[which]
        rows = len(tokens)
        binding.bind_cpu_input("input_ids", np.array(tokens, np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((rows, total), np.int64))
        binding.bind_cpu_input(SCALE, np.array(scale, np.float32).reshape(rows, 1, 1))
        binding.bind_output("logits")  # unallocated again: its shape follows the tokens
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, -1, :]  # the logits alone, not the key/value buffers

    def forget(self) -> None:
        """Drop the kept system prompt (the next reply reads it again)."""
        self.kept = []
        if self.capacity:
            self._clear(0, self.capacity)

    def _clear(self, start: int, end: int) -> None:
        for keys, values in self.buffers:
            keys[:, :, start:end] = 0
            values[:, :, start:end] = 0

    def prefill(self, ids: list[int], shared_prefix: int, max_new_tokens: int):
        """Read the prompt into both rows (the kept system prompt reused); the last logits [2, vocab]."""
        import numpy as np

        if len(ids) + max_new_tokens > self.capacity:
            self._allocate(len(ids) + max_new_tokens)
        start = shared_prefix if 0 < shared_prefix < len(ids) else 0
        if start and self.kept != ids[:start]:
            self.kept = []
            for row in (0, 1):
                self._run(1 + row, [ids[:start]], start, [float(row)])
            self.kept = ids[:start]
        logits = [self._run(1 + row, [ids[start:]], len(ids), [float(row)])[0] for row in (0, 1)]
        return np.stack(logits), start

    def generate(self, ids: list[int], max_new_tokens: int, streamer, processors, sample: bool, eos: list[int],
                 pad: int | None, stopping_criteria=(), shared_prefix: int = 0, draw=None) -> None:
        """Decode both rows after `ids`; a row that ends pads until both have, and the stopping
        criteria end both, as in `generate` (`decoder.next_tokens`)."""
        import torch

        from .decoder import next_tokens

        if streamer is not None:
            streamer.put(torch.tensor([ids, ids]))
        end = len(ids)
        start = 0
        try:
            scores, start = self.prefill(ids, shared_prefix, max_new_tokens)
            history = torch.tensor([ids, ids])
            unfinished = torch.ones(2, dtype=torch.bool)
            eos_ids = torch.tensor(eos, dtype=history.dtype)
            for step in range(max_new_tokens):
                token, history, unfinished = next_tokens(processors, sample, history, torch.from_numpy(scores),
                                                         unfinished, pad, eos_ids, stopping_criteria, draw)
                if streamer is not None:
                    streamer.put(token)
                if not unfinished.any() or step == max_new_tokens - 1:
                    break
                end += 1
                scores = self._run(0, token[:, None].tolist(), end, [0.0, 1.0])
        finally:  # nothing of the conversation stays; a prompt read from the start replaced the kept one
            if not start:
                self.kept = []
            if self.capacity:
                self._clear(len(self.kept), min(end + 1, self.capacity))


def generate(model, pair: PairDecoder, input_ids, max_new_tokens: int, streamer=None, stopping_criteria=None,
             pad_token_id: int | None = None, shared_prefix: int = 0, **settings) -> None:
    """`generate` for Compare's two rows on a pair model: the arguments `ChatEngine` gives the
    torch engine (`input_ids` one row, both rows read it), the same logits processors' scores
    (`lean_sampling`)."""
    from .decoder import _processors, causal_lm, eos_and_pad

    lm = causal_lm(model)
    settings.pop("attention_mask", None)
    eos, pad = eos_and_pad(lm, pad_token_id)
    ids = input_ids[0].tolist()
    processors, sample, draw = lean_sampling(*_processors(lm, len(ids), settings, eos))
    pair.generate(ids, max_new_tokens, streamer, processors, sample, eos, pad, stopping_criteria, shared_prefix, draw)


def lean_sampling(processors, sample: bool):
    """(processors, sample, draw) for the pair's steps: transformers' processors, giving the same
    scores in fewer passes over the vocabulary. The repetition penalty and the minimum length write
    into the step's own logits; temperature, top-k and top-p (the last steps before sampling, as
    in generate) become one draw among the top-k tokens (`top_k_draw`), or among the most likely
    ones without top-k (`nucleus_draw`). Transformers' processors copy the vocabulary's scores
    several times a step: at the app's settings (top-k 50, top-p 0.9) 4-5 ms of a pair's
    20 ms step on this CPU."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    lean = LogitsProcessorList()
    for p in processors:
        if type(p) is RepetitionPenaltyLogitsProcessor and p.prompt_ignore_length is None:
            p = PenaltyInPlace(p)
        elif type(p) is MinNewTokensLengthLogitsProcessor:
            p = NoEosInPlace(p)
        lean.append(p)
    if not sample:
        return lean, False, None
    warpers = {}  # the trailing warpers, in generate's order: temperature, top-k, top-p
    for kind in (TopPLogitsWarper, TopKLogitsWarper, TemperatureLogitsWarper):
        if lean and type(lean[-1]) is kind:
            warpers[kind] = lean.pop()
    top_k, top_p = warpers.get(TopKLogitsWarper), warpers.get(TopPLogitsWarper)
    temperature = warpers.get(TemperatureLogitsWarper)
    if top_k is not None:
        return lean, True, top_k_draw(top_k.top_k, top_p.top_p if top_p else 1.0,
                                      temperature.temperature if temperature else 1.0, list(warpers.values())[::-1])
    if temperature is not None:
        lean.append(temperature)
    return lean, True, nucleus_draw(top_p.top_p) if top_p is not None else None


class PenaltyInPlace:
    """transformers' RepetitionPenaltyLogitsProcessor with the same numbers, written into the
    scores (which are the step's own) instead of two copies of them."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, input_ids, scores):
        import torch

        if int(input_ids.max()) >= scores.shape[-1]:  # ids past the output head: transformers' way
            return self.processor(input_ids, scores)
        penalty, score = self.processor.penalty, scores.gather(1, input_ids)
        return scores.scatter_(1, input_ids, torch.where(score < 0, score * penalty, score / penalty))


class NoEosInPlace:
    """transformers' MinNewTokensLengthLogitsProcessor, written into the scores."""

    def __init__(self, processor):
        self.prompt_length, self.min_new_tokens = processor.prompt_length_to_skip, processor.min_new_tokens
        self.eos = [int(e) for e in processor.eos_token_id.reshape(-1).tolist()]

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] - self.prompt_length < self.min_new_tokens:
            eos = [e for e in self.eos if 0 <= e < scores.shape[-1]]
            scores[:, eos] = float("-inf")
        return scores


def top_k_nucleus(scores, top_k: int, top_p: float = 1.0, temperature: float = 1.0):
    """(token ids [rows, k], their probabilities, zero outside the nucleus) as transformers'
    temperature, top-k and top-p warpers and a softmax leave them, from one top-k of the scores.
    None where a row ties at the k-th score (top-k then keeps more than k)."""
    import torch

    k = min(top_k, scores.shape[-1])
    values, index = scores.topk(min(k + 1, scores.shape[-1]), dim=-1)
    if temperature != 1.0:
        values = values / temperature  # the warper divides every score before top-k: the same order
    if k < values.shape[-1] and bool((values[:, k - 1] == values[:, k]).any()):
        return None
    values, index = values[:, :k], index[:, :k]
    weights = nucleus_weights(values, torch.logsumexp(values, dim=-1, keepdim=True), top_p)
    return None if weights is None else (index, weights)


def top_k_draw(top_k: int, top_p: float, temperature: float, warpers):
    """Temperature, top-k, top-p and a multinomial draw as transformers' warpers and generate do
    them, from `top_k_nucleus`: the same tokens with the same probabilities (tested). A row that
    ties at the k-th score is drawn the full way, by `warpers`."""
    return candidate_draw(lambda scores: top_k_nucleus(scores, top_k, top_p, temperature), warpers)


def candidate_draw(kept, warpers):
    """A multinomial draw among the candidates `kept(scores)` gives ((ids, weights), or None to
    draw the full way: `warpers` over the whole vocabulary, then softmax, as generate does)."""
    import torch

    def draw(scores):
        candidates = kept(scores)
        if candidates is None:
            for warper in warpers:
                scores = warper(None, scores)
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        index, weights = candidates
        return index.gather(-1, torch.multinomial(weights, num_samples=1)).squeeze(1)

    return draw


NUCLEUS_CANDIDATES = 256


def nucleus(scores, top_p: float, candidates: int = NUCLEUS_CANDIDATES):
    """(token ids [rows, candidates], their weights, zero outside the nucleus) as transformers'
    TopPLogitsWarper keeps them: the most likely tokens, each while the probability mass above
    it is under top_p. None where a row's nucleus reaches past the `candidates` most likely."""
    import torch

    values, index = scores.topk(min(candidates, scores.shape[-1]), dim=-1)
    weights = nucleus_weights(values, torch.logsumexp(scores, dim=-1, keepdim=True), top_p)
    return None if weights is None else (index, weights)


def nucleus_weights(values, total, top_p: float):
    """Probabilities of scores sorted from the highest (`values`, `total` the logsumexp of all the
    row's scores), zero past the nucleus: a token is kept while the mass above it is under top_p,
    which is what TopPLogitsWarper keeps. None where the nucleus reaches past the values."""
    import torch

    probs = (values - total).exp()
    above = probs.cumsum(-1) - probs
    if top_p < 1.0 and bool(((above[:, -1] + probs[:, -1]) < top_p).any()):
        return None
    return torch.where(above < top_p, probs, torch.zeros_like(probs)) if top_p < 1.0 else probs


def nucleus_draw(top_p: float, candidates: int = NUCLEUS_CANDIDATES):
    """Top-p sampling as transformers' TopPLogitsWarper and a multinomial draw do it, without
    sorting the vocabulary: sorting two rows of 49,152 and drawing from them took 6.6 ms a step
    by itself; in the pair's sampled replies this is 12-15% sooner. A row whose nucleus reaches
    past the candidates (none in 500 steps of the app's settings) is drawn the full way."""
    from transformers.generation.logits_process import TopPLogitsWarper

    return candidate_draw(lambda scores: nucleus(scores, top_p, candidates), [TopPLogitsWarper(top_p)])
