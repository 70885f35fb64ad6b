"""Int8 serving on CPU (`--quantize int8`): the policy's Linear layers swapped for torch.ao's
dynamically quantized Linear, applied as a function to an unchanged model (as gpt-fast applies
its quantization).

Weights are quantized once, symmetric int8 with one scale per output row (per-channel: a row of
small weights keeps its precision instead of sharing the largest row's scale); activations are
quantized on every call, one uint8 scale and zero point per tensor from its own min and max
(dynamic: no calibration data). The product is fbgemm's or oneDNN's int8 GEMM (AVX-512 VNNI
where the CPU has it) accumulated in int32 and returned in fp32; nothing is hand-written.
Embeddings, norms, attention and the KV cache stay fp32, so only the Linear matmuls change.

torch.ao.quantization is deprecated in favour of the separate torchao package, but torch 2.15
still ships and runs it, and torchao's CPU int8 path wants torch.compile; tests/test_quantize.py
fails if it stops working. How far int8 moves the logprobs: bench/dtype_parity.py --compare int8.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

MODES = ("none", "int8")
"""Values of the policy server's --quantize."""
INT8_ENGINES = ("fbgemm", "x86", "onednn")
"""torch quantized engines with x86 int8 GEMMs, preferred first. fbgemm first: decoding GPT-2-small at
32 sequences in-process on the 2-core Xeon of bench/RESULTS.md it gave 455 and 433 tok/s against 414 and 420
for 'x86' (which picks fbgemm or oneDNN per shape) and 391 and 397 for oneDNN, rounds interleaved.
qnnpack is left out: it is the ARM engine, and its dynamic Linear on x86 is a slow fallback."""


class QuantizationUnsupported(RuntimeError):
    """The requested mode cannot run with this torch build, CPU or model placement."""


def int8_engine(supported: list[str]) -> str:
    """The quantized engine to run int8 Linears on, from torch.backends.quantized.supported_engines."""
    for engine in INT8_ENGINES:
        if engine in supported:
            return engine
    raise QuantizationUnsupported(
        f"--quantize int8 needs one of torch's x86 quantized engines ({', '.join(INT8_ENGINES)}); this torch build "
        f"has {', '.join(supported) or 'none'} (torch.backends.quantized.supported_engines). Serve without --quantize.")


def check_int8(model: nn.Module) -> None:
    """Refuses a model int8 cannot serve: dynamic quantized Linears run on CPU from fp32 weights only."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise QuantizationUnsupported(f"--quantize int8 runs on CPU only (the model is on {p.device}); "
                                      "on a GPU serve with --dtype bfloat16 instead")
    if p.dtype != torch.float32:
        raise QuantizationUnsupported(f"--quantize int8 quantizes fp32 weights (the model is {p.dtype}): "
                                      "leave --dtype at float32")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swaps every nn.Linear of `model` (in place, lm_head included) for an int8 dynamic Linear."""
    check_int8(model)
    # process-wide: a quantized Linear runs on the engine current at call time, which must be the one that packed it
    torch.backends.quantized.engine = int8_engine(torch.backends.quantized.supported_engines)
    with warnings.catch_warnings():   # torch.ao's and quantized tensors' deprecation notices (module docstring)
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                                               dtype=torch.qint8, inplace=True)
    return model


def apply(model: nn.Module, mode: str) -> nn.Module:
    """`model` served in `mode` (one of MODES)."""
    if mode not in MODES:
        raise QuantizationUnsupported(f"unknown quantization mode {mode!r} (supported: {', '.join(MODES)})")
    return quantize_int8(model) if mode == "int8" else model
