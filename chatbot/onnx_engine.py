"""Chat decoding on ONNX Runtime GenAI: the fast CPU path.

The model (and each adapter, merged into a float copy of it first) is exported once by
onnxruntime-genai's model builder into an int8 graph (`MatMulNBits`, 8-bit weights in blocks of
32, int8 products; gate and up fused) under `cache_dir()/onnx-genai/`, and decoded by its C++
loop with as many threads as torch uses: no Python runs between the kernels of a token. On this
project's 2-core CPU that decodes 2.3-4 times as fast as the torch engine (README, *Speed*).
Compare's two rows decode here too, from a pair model (`onnx_pair.py`). The torch model stays
loaded for what this path does not do: training, evaluation, and anything it cannot export.

    models = OnnxModels(model_dir).add({"base": None, "counsel": Path("adapters/smollm2-135m-counsel")})
    models.generate("counsel", ids, GenerationConfig(), stop, streamer)

`backend="auto"` takes this path on a CPU with int8 weights when onnxruntime-genai is installed
and the model is a local folder; anything that fails on the way is logged and the torch engine
serves instead, so a reply never depends on this module working.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .config import BACKEND_CHOICES, GenerationConfig, cache_dir

EXPORT_VERSION = 2  # bump when the export changes, so cached graphs are rebuilt
KEPT_MAX_LENGTH = 2048  # context of a kept generator (its key/value buffer: about 90 MB for the default model)
KEPT_GENERATORS = 4  # base, adapters, a second set of search options


class OnnxUnavailable(RuntimeError):
    """The ONNX path cannot serve this model (missing package, not a local folder, export failed)."""


def available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def _files_key(folder: Path, patterns: tuple[str, ...]) -> list:
    """Names, sizes and modification times of a folder's files that matter for an export."""
    files = sorted(p for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def export_key(model_dir: Path, adapter_dir: Path | None) -> str:
    import onnxruntime_genai

    parts = {"version": EXPORT_VERSION, "genai": onnxruntime_genai.__version__, "model": str(Path(model_dir).resolve()),
             "model_files": _files_key(model_dir, ("*.json", "*.safetensors", "*.bin")),
             "adapter": str(Path(adapter_dir).resolve()) if adapter_dir else None,
             "adapter_files": _files_key(adapter_dir, ("adapter_*",)) if adapter_dir else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _merged_copy(model_dir: Path, adapter_dir: Path, target: Path) -> None:
    """The adapter merged into a float32 copy of the base, saved as a transformers folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)


def export(model_dir: Path, adapter_dir: Path | None = None, root: Path | None = None) -> Path:
    """The int8 ONNX GenAI folder for a model (and adapter), built once and then reused."""
    if not available():
        raise OnnxUnavailable("onnxruntime-genai is not installed")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise OnnxUnavailable(f"{model_dir} is not a local transformers folder")
    out = Path(root or cache_dir() / "onnx-genai") / export_key(model_dir, adapter_dir)
    if (out / "genai_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        source = model_dir
        if adapter_dir is not None:
            source = Path(tmp) / "merged"
            _merged_copy(model_dir, Path(adapter_dir), source)
        built = Path(tmp) / "onnx"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(source), "-i", str(source),
               "-o", str(built), "-p", "int8", "-e", "cpu", "-c", str(Path(tmp) / "cache"),
               "--extra_options", "fuse_mlp_gate_up=true"]  # one product for gate and up: fewer calls, same numbers
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not (built / "genai_config.json").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise OnnxUnavailable(f"the ONNX export failed: {' | '.join(tail)}")
        for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
            (built / name).unlink(missing_ok=True)  # prompts are built and decoded by the project's tokenizer
        publish(built, out)
    return out


def publish(built: Path, out: Path) -> None:
    """Move a finished export into place in one step, so that no reader sees half of one."""
    try:
        os.replace(built, out)
    except OSError:  # another process finished the same export first
        if not (out / "genai_config.json").is_file():
            raise


class OnnxModels:
    """ONNX GenAI models of one base model, by adapter name; streams token ids into a
    transformers streamer."""

    def __init__(self, model_dir: Path, root: Path | None = None):
        self.model_dir, self.root, self.models, self.folders = Path(model_dir), root, {}, {}
        self.pairs: dict = {}  # adapter name -> Compare's pair model (base and adapter, a row each)
        self.adapter_dirs: dict = {}  # adapter name -> its folder (None: the base model)
        self._kept: dict = {}  # (name, search options) -> (generator, prefix tokens)

    def add(self, adapters: dict[str, Path | None]) -> "OnnxModels":
        """Load (exporting first where needed) a model per name: None for the base model alone,
        else an adapter folder to merge in."""
        for name, adapter_dir in adapters.items():
            self.folders[name] = export(self.model_dir, adapter_dir, self.root)
            self.models[name] = load(self.folders[name])
            self.adapter_dirs[name] = adapter_dir
        return self

    def add_pair(self, name: str, adapter_dir: Path) -> "OnnxModels":
        """Load (building first where needed) Compare's pair model of the base and this adapter
        (`onnx_pair.py`); raises OnnxUnavailable for an adapter it cannot map."""
        from .onnx_pair import PairDecoder, export_pair

        self.folders[("pair", name)] = export_pair(self.model_dir, adapter_dir, self.root)
        self.pairs[name] = PairDecoder(self.folders[("pair", name)], threads())
        return self

    def forget(self) -> None:
        """Drop the kept generators and the pair models' kept system prompts (read again on the next reply)."""
        self._kept.clear()
        for pair in self.pairs.values():
            pair.forget()

    def __contains__(self, name) -> bool:
        return name in self.models

    def _search_options(self, gen: GenerationConfig) -> dict:
        options = {"repetition_penalty": gen.repetition_penalty, "do_sample": gen.temperature > 0}
        if gen.temperature > 0:
            options.update(temperature=gen.temperature, top_p=gen.top_p, top_k=0)
            if gen.seed is not None:
                options["random_seed"] = int(gen.seed)
        return options

    def _new_generator(self, name: str, options: dict, max_length: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.models[name])
        params.set_search_options(max_length=max_length, **options)
        return og.Generator(self.models[name], params)

    def _generator(self, name: str, ids: list[int], gen: GenerationConfig, shared_prefix: int,
                   min_new_tokens: int | None = None):
        """(generator, tokens of `ids` it has already read, prefix length to rewind to or None).

        With a shared prefix (the system prompt's tokens, `ChatEngine.shared_prefix`) a generator
        per model and search options is kept, holding only that prefix between replies: each reply
        appends the rest of its prompt, and is rewound to the prefix when it ends. A seeded reply
        gets a fresh generator, so the seed alone decides its sampling."""
        options = self._search_options(gen)
        if min_new_tokens:  # the benchmark's forced reply length
            options["min_length"] = len(ids) + min_new_tokens
        if shared_prefix <= 0 or gen.seed is not None or len(ids) + gen.max_new_tokens > KEPT_MAX_LENGTH:
            return self._new_generator(name, options, len(ids) + gen.max_new_tokens), 0, None
        key = (name, tuple(sorted(options.items())))
        prefix = ids[:shared_prefix]
        kept = self._kept.pop(key, None)
        if kept is None or kept[1] != prefix:
            generator = self._new_generator(name, options, KEPT_MAX_LENGTH)
            generator.append_tokens(prefix)
            kept = (generator, prefix)
        self._kept[key] = kept  # most recently used last
        while len(self._kept) > KEPT_GENERATORS:
            self._kept.pop(next(iter(self._kept)))
        return kept[0], shared_prefix, shared_prefix

    def generate(self, name: str, ids: list[int], gen: GenerationConfig, stop: threading.Event, streamer,
                 eos_token_id=None, shared_prefix: int = 0, min_new_tokens: int | None = None) -> list[int]:
        """Decode after `ids` with the named model, putting the prompt and then each new token
        into `streamer` (a transformers streamer; the caller calls end()). Stops at an
        end-of-sequence token, after gen.max_new_tokens, or when `stop` is set; returns the new
        tokens. Callers hold the generation lock (kept generators are shared)."""
        import torch

        generator, start, rewind = self._generator(name, ids, gen, shared_prefix, min_new_tokens)
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        out: list[int] = []
        streamer.put(torch.tensor([ids]))  # the prompt, which a skip_prompt streamer drops
        try:
            generator.append_tokens(ids[start:])
            while not stop.is_set() and not generator.is_done() and len(out) < gen.max_new_tokens:
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in stops and len(out) >= (min_new_tokens or 0):
                    break
                out.append(token)
                streamer.put(torch.tensor([token]))
        finally:
            if rewind is not None:  # nothing of the conversation stays in the kept generator
                try:
                    generator.rewind_to(rewind)
                except Exception:  # noqa: BLE001 - one that cannot rewind is never used again
                    self.forget()
                    raise
        return out


# How long ONNX Runtime's idle threads spin before they sleep. Its default kept a core busy for
# about 40 ms after every reply, beside the final output check; 1 ms still spans the gap between
# tokens. By hand, 30 interleaved pairs each: decoding the same (0.67 s a reply either way), the
# stream wrapper +3.5% against +6.4% and +3.2% against +4.9% (300 us).
SPIN_US = 1000


def load(folder: Path):
    """An exported model, its products on `threads()` threads: with onnxruntime-genai's own
    default the engine decoded at 68-73 tok/s on this project's 2-core machine, with two threads
    at 98-100 (`make bench`)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads(), "session.intra_op.spin_duration_us": str(SPIN_US)}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def threads() -> int:
    """Threads for ONNX Runtime's products: torch's count (OMP_NUM_THREADS, else the usable cores)."""
    import torch

    return max(1, torch.get_num_threads())


def bytes_per_token(folder: Path) -> int:
    """Bytes of weights one decoding step reads in an exported graph: every MatMulNBits product's
    weights and scales and every norm's weights; of the embedding table one row."""
    import numpy as np
    import onnx

    graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
             for t in graph.initializer}
    dims = {t.name: list(t.dims) for t in graph.initializer}
    total = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits" or node.op_type.endswith("LayerNormalization"):
            total += sum(sizes.get(name, 0) for name in node.input)
        elif node.op_type == "Gather" and node.input[0] in sizes:  # the embedding: one row per token
            total += sizes[node.input[0]] // dims[node.input[0]][0]
    return total


def resolve_backend(backend: str, device: str, quantize: str) -> str:
    """'onnx' or 'torch' for a requested backend: auto takes ONNX on a CPU with int8 weights."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        return "onnx" if device == "cpu" and quantize == "int8" and available() else "torch"
    return backend

