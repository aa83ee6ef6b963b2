"""Weight-only int8 for CPU decoding: per-output-channel int8 weights, bfloat16 matmul.

    from chatbot.int8 import quantize_int8
    quantize_int8(model)   # after any adapter is attached or merged

Decoding a small model on a CPU reads every weight once per token, so smaller weights mean more
tokens per second. torch ships the kernel (`aten._weight_int8pack_mm`, the one torchao and
gpt-fast use); torchao's tensor-subclass wrapper around it costs more per call than it saves on a
135M model in eager mode (measured: 20.6 tok/s against 36), so the Linear layers are swapped here
for a plain module that calls the kernel directly. Everything else (embeddings, norms, attention,
LoRA matrices) stays float32. `python -m bench.formats` measures speed and perplexity.

Hot-swapped adapters: running LoRA beside every layer costs a 135M model a third of its decoding
speed in Python overhead. So each LoRA-wrapped layer also keeps an int8 copy of its weight with
each adapter merged in (a "variant"); `select_variant(model, name)` points the layers at those
copies, and with PEFT's adapter layers disabled a fine-tuned reply decodes as fast as a merged
model. Each adapter's variants cost the int8 size of the layers it targets (about 106 MB for all
seven projections of SmolLM2-135M). The compare view batches two rows (`select_pair`): both read
the base weights once, and each row adds its own adapter's low-rank product, as PEFT does for a
mixed batch but without PEFT's per-layer overhead. PEFT's layers remain for adapters that cannot
be merged (DoRA).

Each layer's q/k/v and gate/up projections keep their int8 weights (of every variant) stacked in
one buffer, each module's weight a view of its rows (`pack_groups`): the same memory, and the
decoding loop (chatbot/decoder.py) reads a group with one kernel call (`stacked`).
"""

from __future__ import annotations

import contextlib
import gc
import threading

import torch
from torch import nn


PREFILL_ROWS = 32  # from this many rows (prompt tokens x batch) up, de-quantise and use a float GEMM
_PROMPT = threading.local()


@contextlib.contextmanager
def prompt_path():
    """Products in this thread take the prompt's float path whatever their row count: a prompt run
    in parts (chatbot/decoder.py's kept system prefix, then the rest) gets the numbers it would
    get whole."""
    _PROMPT.active = True
    try:
        yield
    finally:
        _PROMPT.active = False


def on_prompt_path() -> bool:
    return getattr(_PROMPT, "active", False)


BASE_VARIANT = "base"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (int8 weight, bfloat16 scales)."""
    with torch.no_grad():
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp_(min=1e-8).div_(127)
        q = (weight / scales[:, None]).round_().clamp_(-127, 127)  # one float temporary, not three
        return q.to(torch.int8), scales.to(torch.bfloat16)


class Int8Linear(nn.Linear):
    """A frozen nn.Linear with int8 weights and one bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scales = quantize_weight(linear.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.variants: dict[str, tuple[torch.Tensor, torch.Tensor]] = {BASE_VARIANT: (weight, scales)}
        self.pair: tuple[str, str] | None = None  # set by select_pair for a two-row compare batch
        self.pair_loras: list = []  # per row: (A, B, scaling) of its adapter, or None for the base

    def dequantized(self) -> torch.Tensor:
        weight, scales = self.variants[BASE_VARIANT]
        return weight.float() * scales.float()[:, None]

    def select(self, name: str) -> None:
        """Point this layer at a variant's weights (the base weights if it has none)."""
        self.weight, self.scales = self.variants.get(name, self.variants[BASE_VARIANT])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair is not None and x.shape[0] == 2:
            # compare: both rows share one read of the base weights; each row adds its own
            # adapter's low-rank product, as PEFT's mixed batches do
            y = self._matmul(x, *self.variants[BASE_VARIANT])
            for row, lora in enumerate(self.pair_loras):
                if lora is not None:
                    a, b, scaling = lora
                    y[row].addmm_(x[row] @ a.t(), b.t(), alpha=scaling)
            return y
        return self._matmul(x, self.weight, self.scales)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] < PREFILL_ROWS and not on_prompt_path():  # decoding: a quarter of the bytes
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), weight, scales).to(x.dtype)
        else:  # a prompt: the kernel is compute-bound on AVX2, a float32 GEMM is faster
            y = flat @ (weight.to(x.dtype) * scales.to(x.dtype)[:, None]).t()
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def int8_supported() -> bool:
    """Whether this torch build runs the int8 kernel on this CPU (checked once per load)."""
    try:
        x = torch.ones(1, 64, dtype=torch.bfloat16)
        w = torch.ones(8, 64, dtype=torch.int8)
        return bool(torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16))[0, 0] == 64)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _skip(name: str) -> bool:
    """LoRA's own small matrices stay float32: they are what an adapter swap changes."""
    return ".lora_" in name or name.split(".")[-1].startswith("lora_")


def _lora_layers(model: nn.Module) -> list:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _mergeable(layer, name: str) -> bool:
    return not layer.use_dora.get(name, False) and hasattr(layer, "get_delta_weight")


def add_variants(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Give every LoRA-wrapped layer an int8 copy with each adapter merged; return the adapters done.

    Called by quantize_int8 while the base weights are still float32 (merged once, then rounded
    once); for an adapter added later the base is the de-quantised int8 weight. DoRA and other
    adapters without a plain weight delta keep running through PEFT's layers.
    """
    layers = _lora_layers(model)
    all_names = sorted({n for layer in layers for n in layer.lora_A})
    done, int8_bases = [], False
    for name in names or all_names:
        owners = [layer for layer in layers if name in layer.lora_A]
        if not owners or not all(_mergeable(layer, name) for layer in owners):
            continue
        for layer in owners:
            base = layer.get_base_layer()
            if isinstance(base, Int8Linear) and name in base.variants:
                continue
            with torch.no_grad():
                delta = layer.get_delta_weight(name).float()
                weight = base.dequantized() if isinstance(base, Int8Linear) else base.weight.float()
                merged = quantize_weight(weight + delta)
            if isinstance(base, Int8Linear):
                base.variants[name] = merged
                int8_bases = True
            else:
                base._pending_variants = {**getattr(base, "_pending_variants", {}), name: merged}
        done.append(name)
    if int8_bases:
        pack_groups(model)  # the new copies stacked like the base weights
    return done


def _int8_lora_layers(model: nn.Module) -> list:
    return [layer for layer in _lora_layers(model) if isinstance(layer.get_base_layer(), Int8Linear)]


def variant_ready(model: nn.Module, name: str, layers: list | None = None) -> bool:
    """True if the model can run as `name` from merged int8 copies (always, for the base).
    `layers`: the model's int8 LoRA layers where the caller keeps them (found otherwise)."""
    layers = _int8_lora_layers(model) if layers is None else layers
    if name != BASE_VARIANT:
        layers = [layer for layer in layers if name in layer.lora_A]
    return bool(layers) and all(name in layer.get_base_layer().variants for layer in layers)


def select_variant(model: nn.Module, name: str, layers: list | None = None) -> bool:
    """Point every int8 LoRA base layer at adapter `name`'s merged weights (BASE_VARIANT: the base).

    True when the model now runs as `name` once its adapter layers are disabled. False when some
    layer the adapter targets has no merged copy (the caller keeps PEFT's adapter layers); the
    base weights are selected then.
    """
    layers = _int8_lora_layers(model) if layers is None else layers
    ready = variant_ready(model, name, layers)
    for layer in layers:
        layer.get_base_layer().select(name if ready else BASE_VARIANT)
    return ready


def select_pair(model: nn.Module, pair: tuple[str, str] | None, layers: list | None = None) -> bool:
    """Run a batch of two rows as two models (row 0 as pair[0], row 1 as pair[1]); None ends it.

    One forward pass serves both answers of the compare view: the per-layer Python overhead and
    the read of the int8 base weights are paid once, and each row adds its adapter's float LoRA
    product (nothing for BASE_VARIANT). That is the adapter on the int8 base, as PEFT computes it;
    the chat view's merged copy rounds base and adapter together, so the two differ by int8
    rounding (greedy replies can part after some tokens). False (nothing changed) unless both are ready.
    """
    layers = _int8_lora_layers(model) if layers is None else layers
    if pair is not None and not all(variant_ready(model, name, layers) for name in pair):
        return False
    for layer in layers:
        base = layer.get_base_layer()
        base.pair = pair
        # each row's adapter: its own parameters, looked up per compare (no copies are made or kept)
        base.pair_loras = [] if pair is None else [
            (layer.lora_A[n].weight, layer.lora_B[n].weight, float(layer.scaling[n])) if n in layer.lora_A else None
            for n in pair]
    return True


# projections that read the same input, in the order their rows are stacked (see `stacked`)
STACK_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def stacked(layers: list, variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The selected weights and scales of `layers` (or their `variant`) as one matrix, rows in
    order, or None unless they lie end to end in one buffer, as `pack_groups` stores them. One
    kernel call then does the work of several: fewer calls per token and a wider product."""
    if variant is not None:
        if not all(variant in layer.variants for layer in layers):
            return None
        layers = [_Probe(*layer.variants[variant]) for layer in layers]
    first = layers[0]
    weight, scales = first.weight, first.scales
    rows = 0
    for layer in layers:
        if (layer.in_features != first.in_features
                or layer.weight.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
                or layer.weight.data_ptr() != weight.data_ptr() + rows * weight.stride(0)
                or layer.scales.data_ptr() != scales.data_ptr() + rows * scales.element_size()):
            return None
        rows += layer.out_features
    return weight.as_strided((rows, first.in_features), weight.stride()), scales.as_strided((rows,), (1,))


def _pack(layers: list[Int8Linear]) -> None:
    """Store each variant the layers share as one buffer, each layer's weights a view of its rows
    (no extra memory once the separate copies are freed)."""
    with torch.no_grad():
        for name in sorted(set.intersection(*(set(layer.variants) for layer in layers))):
            parts = [layer.variants[name] for layer in layers]
            if stacked(layers, name) is not None:
                continue  # already packed
            weight, scales = torch.cat([w for w, _ in parts]), torch.cat([s for _, s in parts])
            row = 0
            for layer, (old, _) in zip(layers, parts):
                view = (weight[row : row + layer.out_features], scales[row : row + layer.out_features])
                row += layer.out_features
                layer.variants[name] = view
                if layer.weight is old:
                    layer.weight, layer.scales = view


class _Probe:
    """The shape of an Int8Linear around one variant's tensors (for `stacked`)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        self.weight, self.scales = weight, scales
        self.out_features, self.in_features = weight.shape


def pack_groups(model: nn.Module) -> None:
    """Stack the int8 weights of each layer's q/k/v and gate/up projections (every variant)."""
    groups: dict[tuple[str, int], dict[str, Int8Linear]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Int8Linear):
            continue
        parts = name.removesuffix(".base_layer").rsplit(".", 1)
        for index, members in enumerate(STACK_GROUPS):
            if parts[-1] in members:
                groups.setdefault((parts[0], index), {})[parts[-1]] = module
    for (_, index), found in groups.items():
        if len(found) == len(STACK_GROUPS[index]):
            _pack([found[n] for n in STACK_GROUPS[index]])
    gc.collect()
    _release_freed_heap()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every float nn.Linear (base layers, lm_head) by Int8Linear, in place; return model.

    The tied lm_head gets its own int8 copy; the input embedding stays float32 for lookups.
    LoRA-wrapped layers also get each loaded adapter merged in as a variant (add_variants).
    """
    if model.device.type != "cpu":
        raise ValueError("int8 weight-only runs on CPU; on CUDA use quantize=4bit or 8bit.")
    add_variants(model)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not _skip(name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = Int8Linear(module)
        layer.variants.update(getattr(module, "_pending_variants", {}))
        setattr(parent, child, layer)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the head is int8 now; the embedding is not
    # The float weights that stay (embedding, norms, LoRA) may still point into the checkpoint's
    # memory map, which keeps every page read so far resident (420 MB for the default model).
    # Copies let the map go once the float Linear weights are gone.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    pack_groups(model)
    return model


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc): quantizing frees hundreds of MB of float
    temporaries, and without this the process kept 0.2-0.5 GB of them resident, varying by run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
