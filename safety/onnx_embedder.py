"""The sentence embedder on ONNX Runtime: the same vectors as sentence-transformers, about 3x sooner.

A check's time is almost all MiniLM's forward pass: about 11 ms in eager PyTorch on a 2-core
CPU for a short message, 3-5 ms in ONNX Runtime (`make bench`). The model is exported once
(transformer, mean pooling and normalisation in one graph, then attention, layer norms and GELU
fused by onnxruntime's transformer optimizer) into a cache folder, like the chat model's
conversion; later starts load the graph and the tokenizer without importing torch.

int8 weights (onnxruntime's `quantize_dynamic`, per channel) were tried: 1.5x sooner, but the
vectors move (cosine to float32 0.99 on average, 0.97 at worst), and with the heads refitted on
them the held-out record got worse (r/SuicideWatch recall 0.885 to 0.869, control posts flagged
5.0% to 5.4%; output recall on the development examples lower too), so they are not used.

sentence-transformers' own ONNX backend needs optimum-onnx, which pins transformers < 4.58, so
the export here uses torch.onnx directly. Models whose pooling is not a plain mean stay on
sentence-transformers (`load_embedder` decides).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
GRAPH = "model.onnx"


def cache_root() -> Path:
    """Same place as the chat model's conversion: CHATBOT_CACHE_DIR, else ~/.cache/mh-chatbot."""
    env = os.environ.get("CHATBOT_CACHE_DIR")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mh-chatbot"
    return base / "embedder-onnx"


def cache_key(path: str) -> str:
    """Names the export after the model folder and its weights, so a changed model re-exports."""
    parts = [path, "fused-v1"]  # the export's own version: a changed export writes a new folder
    folder = Path(path)
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = weights.stat()
        parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@contextmanager
def building(folder: Path):
    """A scratch folder beside `folder` to write a build into; it becomes `folder` only if the block
    finishes, so a half-written build is never used."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".export-"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def session(graph: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for an embedder: up to 4 threads, and no busy-waiting between
    checks (on a small CPU the spinning threads would slow decoding)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, len(os.sched_getaffinity(0)))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def exportable(st_model) -> bool:
    """Transformer -> mean Pooling (-> Normalize): the shape this module reproduces exactly."""
    names = [type(module).__name__ for module in st_model]
    if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        return False
    return getattr(st_model[1], "pooling_mode", None) == "mean"


def export(st_model, folder: Path) -> Path:
    """Write the graph and the tokenizer into `folder` (atomically: a half-written export is never used)."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    encoder = st_model[0].auto_model
    wrapper = MeanPooled(encoder).eval()
    sample = st_model.tokenizer(["a short example", "another, slightly longer example text"], padding=True,
                                return_tensors="pt")
    attention = encoder.config._attn_implementation
    try:
        with building(folder) as tmp:
            # eager attention exports as the pattern onnxruntime's BERT optimizer fuses (sdpa does not)
            encoder.set_attn_implementation("eager")
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper, (sample["input_ids"], sample["attention_mask"]), str(tmp / GRAPH),
                    input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                    dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
                    opset_version=17, dynamo=False,
                )
            _fuse(tmp / GRAPH, encoder.config)
            st_model.tokenizer.save_pretrained(tmp)
            (tmp / "embedder.json").write_text(json.dumps({"max_seq_length": int(st_model.max_seq_length)}))
    finally:
        encoder.set_attn_implementation(attention)
    return folder


def _fuse(graph: Path, config) -> None:
    """Fuse attention, layer norms and GELU in place (onnxruntime's transformer optimizer): the same
    vectors (to 3e-7), about 10% sooner. Other architectures, and any failure, keep the unfused graph."""
    if getattr(config, "model_type", None) != "bert":  # MiniLM is a BERT; the optimizer matches BERT's patterns
        return
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(str(graph), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=1)
        fused.save_model_to_file(str(graph))
    except Exception as exc:  # noqa: BLE001 - the unfused graph gives the same vectors
        log.warning("embedder graph left unfused (%s: %s)", type(exc).__name__, exc)


class OnnxEmbedder:
    """`encode(texts)` -> unit-length float32 vectors, like SentenceTransformer.encode(normalize_embeddings=True)."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None):
        from tokenizers import Tokenizer

        self.session = session(folder / GRAPH, threads)
        limit = json.loads((folder / "embedder.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(limit)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.padding["pad_id"] if self.tokenizer.padding else 0)

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(list(texts[start : start + batch_size]))
            ids = np.array([e.ids for e in batch], dtype=np.int64)
            mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
            out.append(self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def load(path: str, load_st) -> OnnxEmbedder | None:
    """The cached export for `path` (exported first if missing or unreadable), or None where that
    cannot be done: no onnxruntime, a model of another shape, or a failed export."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    folder = cache_root() / cache_key(path)
    try:
        if (folder / GRAPH).is_file():
            try:
                return OnnxEmbedder(folder)
            except Exception as exc:  # noqa: BLE001 - a damaged cache: export again
                log.warning("cached ONNX embedder unreadable (%s); exporting it again", type(exc).__name__)
        st_model = load_st()
        if not exportable(st_model):
            return None
        return OnnxEmbedder(export(st_model, folder))
    except Exception as exc:  # noqa: BLE001 - the PyTorch embedder still works
        log.warning("ONNX embedder unavailable (%s: %s); using sentence-transformers", type(exc).__name__, exc)
        return None
