"""Merge an adapter into a full-precision copy of its base model and save the result.

    python -m training merge --config training/recipes/smollm2-135m/merge.yaml

Merging always happens in full precision (float32 on CPU, bfloat16 on CUDA). Adding a LoRA update
to 4-bit weights would round it away in part, so a quantized merge is refused in favour of this;
quantize the merged model when you load it instead. An adapter trained with QLoRA learned against
the 4-bit weights: merged into the full-precision base it behaves slightly differently.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from .config import MergeConfig

log = logging.getLogger(__name__)


def trained_quantized(adapter_dir: Path) -> str | None:
    try:
        q = json.loads((adapter_dir / "training_config.json").read_text()).get("quantize")
    except (OSError, ValueError):
        return None
    return q if q not in (None, "none") else None


def run(cfg: MergeConfig) -> dict:
    from chatbot.config import ModelConfig
    from chatbot.loading import adapter_base, attach_adapter, load_base, resolve_adapter

    adapter_dir = resolve_adapter(cfg.adapter)
    base = cfg.model or adapter_base(adapter_dir)
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter does not name its base model; pass --model")
    warnings = []
    if cfg.quantize != "none":
        warnings.append(
            f"quantize={cfg.quantize} ignored: merging into quantized weights rounds the adapter's update, "
            "so the merge uses a full-precision copy of the base"
        )
    q = trained_quantized(adapter_dir)
    if q:
        warnings.append(
            f"this adapter was trained against a {q} base (QLoRA); merged into full-precision weights its "
            "outputs differ slightly from the quantized base plus adapter"
        )
    for w in warnings:
        log.warning(w)
    model, tokenizer = load_base(ModelConfig(model=base, quantize="none", device=cfg.device))
    model = attach_adapter(model, str(adapter_dir)).merge_and_unload()
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"base_model": base, "adapter": str(cfg.adapter), "dtype": str(model.dtype), "warnings": warnings}
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output_dir": str(out), **info}
