"""Weight-only int8 for CPU decoding: per-output-channel int8 weights, bfloat16 matmul.

    from chatbot.int8 import quantize_int8
    quantize_int8(model)   # after any adapter is attached or merged

Decoding a small model on a CPU reads every weight once per token, so smaller weights mean more
tokens per second. torch ships the kernel (`aten._weight_int8pack_mm`, the one torchao and
gpt-fast use); torchao's tensor-subclass wrapper around it costs more per call than it saves on a
135M model in eager mode (measured: 20.6 tok/s against 36), so the Linear layers are swapped here
for a plain module that calls the kernel directly. Everything else (embeddings, norms, attention,
LoRA matrices) stays float32. `python -m bench.formats` measures speed and perplexity.
"""

from __future__ import annotations

import torch
from torch import nn


PREFILL_ROWS = 32  # from this many rows (prompt tokens x batch) up, de-quantise and use a float GEMM


class Int8Linear(nn.Linear):
    """A frozen nn.Linear with int8 weights and one bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] < PREFILL_ROWS:  # decoding: the int8 kernel reads a quarter of the bytes
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
        else:  # a prompt: the kernel is compute-bound on AVX2, a float32 GEMM is faster
            y = flat @ (self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]).t()
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _skip(name: str) -> bool:
    """LoRA's own small matrices stay float32: they are what an adapter swap changes."""
    return ".lora_" in name or name.split(".")[-1].startswith("lora_")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every float nn.Linear (base layers, lm_head) by Int8Linear, in place; return model.

    The tied lm_head gets its own int8 copy; the input embedding stays float32 for lookups.
    """
    if model.device.type != "cpu":
        raise ValueError("int8 weight-only runs on CPU; on CUDA use quantize=4bit or 8bit.")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not _skip(name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the head is int8 now; the embedding is not
    return model
