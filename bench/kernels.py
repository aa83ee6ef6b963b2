"""How fast can one token's weight products run on this CPU? The int8 kernels available here,
against the bandwidth ceiling.

    python -m bench.kernels

One decoding step of the default model (SmolLM2-135M: 30 layers of q/k/v, o, gate/up and down
products, plus the 49,152-row output head), with distinct random weights for every product, so
that they stream from memory as in real decoding rather than sitting in cache. Each kernel runs the
whole set per "token"; nothing else (norms, attention, sampling) is timed. Kernels:
- torch's `_weight_int8pack_mm` (int8 weights, bfloat16 activations): what `chatbot.int8` runs;
- ONNX Runtime's `MatMulNBits` with 8-bit and 4-bit weights (block 32, int8 compute,
  `accuracy_level=4`), all products in one graph, so no Python runs between them.

If the products alone take longer than a token may take at 70% of the ceiling, no engine built on
that kernel can reach it. Writes bench/results/kernels.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
# (in, out) of each product in one layer, as chatbot.int8 groups them (q/k/v and gate/up in one call)
LAYER_SHAPES = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]
SHAPES = LAYER_SHAPES * LAYERS + [(HIDDEN, VOCAB)]


def _best_ms(run, repeats: int = 30) -> float:
    for _ in range(3):
        run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def torch_int8(threads: int) -> tuple[float, int]:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    mats = []
    for k, n in SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        mats.append((w, torch.rand(n, generator=g).to(torch.bfloat16) / 100))
    xs = {k: torch.randn(1, k, generator=g).to(torch.bfloat16) for k in (HIDDEN, INTER)}

    def run():
        with torch.inference_mode():
            for w, s in mats:
                torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, s)

    return _best_ms(run), sum(w.numel() + s.numel() * 2 for w, s in mats)


def ort_nbits(bits: int, threads: int, block: int = 32) -> tuple[float, int]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs, nbytes = [], [], [], 0
    for i, (k, n) in enumerate(SHAPES):
        packed = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
        scales = (rng.random(n * k // block, dtype=np.float32) / 100)
        inits += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=block, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
        nbytes += packed.nbytes + scales.nbytes
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (HIDDEN, INTER)]
    graph = helper.make_graph(nodes, "one_token", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in (HIDDEN, INTER)}
    return _best_ms(lambda: session.run(None, feeds)), nbytes


def main() -> int:
    import os

    from .__main__ import machine, memory_bandwidth_gbs

    threads = os.cpu_count() or 1
    bandwidth = memory_bandwidth_gbs()
    rows = []
    for name, fn in (("torch _weight_int8pack_mm, int8 (the app's kernel)", lambda: torch_int8(threads)),
                     ("ONNX Runtime MatMulNBits, 8-bit", lambda: ort_nbits(8, threads)),
                     ("ONNX Runtime MatMulNBits, 4-bit", lambda: ort_nbits(4, threads))):
        ms, nbytes = fn()
        ceiling_ms = nbytes / (bandwidth * 1e9) * 1e3
        rows.append({"kernel": name, "mb_per_token": nbytes / 1e6, "products_ms": ms,
                     "gb_s": nbytes / ms / 1e6, "ceiling_tok_s": 1e3 / ceiling_ms,
                     "products_only_tok_s": 1e3 / ms, "share_of_ceiling_products_only": ceiling_ms / ms})
    print(f"{machine()}; {threads} threads; array copy {bandwidth:.1f} GB/s\n")
    print("| kernel | MB per token | one token's products | rate | ceiling | tok/s with nothing else | share of ceiling |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['mb_per_token']:.0f} | {r['products_ms']:.1f} ms | {r['gb_s']:.1f} GB/s | "
              f"{r['ceiling_tok_s']:.0f} tok/s | {r['products_only_tok_s']:.0f} | {r['share_of_ceiling_products_only']:.0%} |")
    out = Path(__file__).parent / "results" / "kernels.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "bandwidth_gb_s": bandwidth, "kernels": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
