"""CUDA graph capture shared by the encoder's graphs (`fastvlm.vision.fastvithd`) and the decode step's
(`fastvlm.kernels.graph_decode`).

PyTorch allows one capture at a time in a process, so captures take `CAPTURE_LOCK`. Each capture runs on a
side stream of its own on the tensors' device (`torch.cuda.graph`'s shared default stream lives on whichever
device was current at the first capture, and a capture for a model on another GPU would then record nothing),
and calls `CUDAGraph.capture_begin` / `capture_end` directly: `torch.cuda.graph` also synchronises the device
and empties the allocator's cache on every capture, which a capture per generation would pay each time. The
caller's stream is restored whatever happens, so a failed capture leaves its thread on its own stream.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

CAPTURE_LOCK = threading.RLock()
# set on a language model (by `FastVLM.optimize_for_inference`) whose batch-1 CUDA decode steps replay a CUDA graph
GRAPH_DECODE_FLAG = "_fastvlm_graph_decode"


def capture(fn: Callable[[], Any], device: torch.device, warmup: int = 1) -> tuple[Any, Any]:
    """(graph, fn's output from the capture): fn runs `warmup` times eagerly on a side stream (cuDNN's and
    cuBLAS's lazy set-up must not happen inside the capture), then once under capture on that stream; the
    caller's stream waits for the warm-up. Raises RuntimeError where the capture fails. A capture that fails
    in `capture_end` may leave PyTorch's allocator counting it as under way; its messages then say so."""
    with CAPTURE_LOCK, torch.cuda.device(device):
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_stream(side)
        try:
            for _ in range(warmup):
                fn()
            graph.capture_begin(capture_error_mode="thread_local")  # other threads may use the GPU meanwhile
            try:
                out = fn()
            finally:
                graph.capture_end()
        finally:
            torch.cuda.set_stream(caller)
        caller.wait_stream(side)
    return graph, out
