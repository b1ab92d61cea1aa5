"""CUDA graphs for row-by-row synthesis: a cache of captured graphs, one per input shape.

Row-by-row synthesis (inference.py) is a long chain of small kernels whose launches, not their
arithmetic, bound its speed on a GPU; replaying them as one captured CUDA graph removes that cost.
`CudaGraphCache` is the one piece of synthesis state worth keeping across calls: its owner (a
benchmark, a synthesis command, a server) creates it and passes it to every `synthesize` call.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

import torch


class Graph(Protocol):
    """What `CudaGraphCache` keeps per shape: a captured function that replays for new inputs."""

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


class CapturedGraph:
    """`function(*inputs)` captured as one CUDA graph, replayed for new inputs of the same shapes.

    A replay copies the inputs into the graph's own (static) input tensors, launches the graph and
    clones its static output, all on the caller's current stream: it is ordered with the caller's
    work as an eager call would be, and nothing waits on the host. Replays from different streams
    take turns through `done`, an event recorded after each replay's clone, which the next replay's
    stream waits on before it overwrites the static inputs; `record_stream` keeps the static
    tensors' memory from going to other tensors (once the graph is dropped) while a stream that
    replayed may still use it. The caller runs one `replay` of a graph at a time on the host (the
    cache's per-graph lock), so that each replay waits on the event its predecessor recorded.
    """

    def __init__(self, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        """Capture `function(*inputs)` on a side stream. What capture raises (out of memory, most
        likely) reaches the caller with the stream capture ended and the caller's stream current.

        Not `torch.cuda.graph`: when `capture_begin` or `capture_end` raises, it leaves its capture
        stream current in the thread, and without a stream of its own, captures share one."""
        with torch.cuda.device(inputs[0].device):
            caller = torch.cuda.current_stream()
            self.inputs = tuple(tensor.clone() for tensor in inputs)
            side = torch.cuda.Stream()  # capture needs a stream other than the default one
            side.wait_stream(caller)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(side):
                    function(*self.inputs)  # a warm-up: lazy initialisation (library handles) cannot be captured
                    # The allocator cannot release cached blocks while capturing: release them now, so that the
                    # graph's new memory pool can have all the memory there is (as torch.cuda.graph does).
                    torch.cuda.empty_cache()
                    # "thread_local": other threads may go on with their own work (on other streams) meanwhile.
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        self.output = function(*self.inputs)
                    finally:
                        graph.capture_end()  # whatever happened: a stream left capturing fails all its later work
            finally:
                caller.wait_stream(side)
            self.graph = graph
            self.done = torch.cuda.Event()
            self.done.record(caller)  # the static inputs' clones, for a replay on another stream

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`function(*inputs)` from the graph, on the caller's current stream: -> a new tensor."""
        with torch.cuda.device(self.output.device):
            stream = torch.cuda.current_stream()
            stream.wait_event(self.done)
            for static, tensor in zip(self.inputs, inputs, strict=True):
                static.copy_(tensor)
            self.graph.replay()  # on the current stream
            output = self.output.clone()
            self.done.record(stream)
            for static in (*self.inputs, self.output):
                static.record_stream(stream)
        return output


class CudaGraphCache:
    """Replays a function of CUDA tensors from a captured CUDA graph, per input shape.

    Row-by-row synthesis is a long chain of small kernels whose launches, not their
    arithmetic, bound its speed on a GPU: replaying them as one graph removes that cost.
    A shape is run eagerly the first time it is seen and captured the second time, so a
    one-off length pays nothing for capture, and a length synthesized again (a benchmark,
    a server with fixed-size requests, a batch of equal clips) runs at the graph's speed.
    Graphs are keyed by the inputs' shapes, dtypes and devices and by the caller's `key`
    (`synthesize` passes a fingerprint of the parameters, their storage and version, so
    loading or folding weights never replays a stale graph). At most `size` graphs are
    kept, least recently used first out, since each holds its own memory pool.

    The cache outlives the calls that use it, so its owner (a benchmark, a synthesis
    command, a server) creates it and passes it to every call. Any number of threads may
    call it, each on any CUDA stream. Its lock guards the bookkeeping only: no thread holds
    it while a shape runs eagerly, is captured or replays. Callers of one shape take turns
    on its graph's static tensors (a lock per graph, held while a replay is queued on the
    caller's stream, ordered on the GPU as `CapturedGraph` says); other shapes never wait.
    One shape is captured at a time, as PyTorch expects one capture under way at a time in
    a process (its allocator cannot empty its cache, as a capture starts by doing, during
    another: share one cache per process); meanwhile the others, that one included, run
    eagerly.

    A capture that fails (out of memory, most likely: it runs the function twice into a new
    memory pool while older graphs hold theirs) falls back to an eager call, with one
    warning per cache. Its shape runs eagerly from then on, without new attempts: what
    failed would most likely fail again (the same graphs hold the same memory; an operation
    that cannot be captured stays one), each attempt costs two calls, and the eager call
    gives the same result. Only a shape forgotten (beyond the `4 * size` most recent new
    ones) is tried again.

    `capture(function, inputs)` makes a graph (`CapturedGraph`); tests stand in for it on
    the CPU.
    """

    def __init__(
        self,
        size: int = 4,
        capture: Callable[[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]], Graph] = CapturedGraph,
    ):
        self.size = size
        self.capture = capture
        self.graphs: OrderedDict[Hashable, tuple[threading.Lock, Graph]] = OrderedDict()  # most recent last
        self.seen: OrderedDict[Hashable, bool] = OrderedDict()  # keys without a graph -> whether capture failed
        self.capturing = False
        self.warned = False
        self.lock = threading.Lock()

    def __call__(
        self, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], key: Hashable
    ) -> torch.Tensor:
        key = (key, tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in inputs))
        with self.lock:
            entry = self.graphs.get(key)
            capture = entry is None and self.seen.get(key) is False and not self.capturing
            if entry is not None:
                self.graphs.move_to_end(key)
            elif capture:
                self.capturing = True
            elif key not in self.seen:
                self.remember(key, failed=False)
        if entry is not None:
            return self.replay(entry, inputs)
        if capture:
            return self.capture_and_replay(function, inputs, key)
        return function(*inputs)  # new, failed to capture, or waiting for its turn to be captured

    def capture_and_replay(
        self, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], key: Hashable
    ) -> torch.Tensor:
        """Capture `function` for `key` and replay it for `inputs`, or call it eagerly if capture fails."""
        graph, failure, entry = None, None, None
        try:
            graph = self.capture(function, inputs)
        except Exception as error:  # whatever it was, the eager call gives the same result or raises its own error
            # Its text only: the error's traceback holds the failed graph and its memory, needed by the eager call.
            reason = str(error).strip().partition("\n")[0]  # the first line: out-of-memory messages run on
            failure = f"{type(error).__name__}: {reason}"
        finally:  # also when interrupted: the next shape's capture must not wait forever
            with self.lock:
                self.capturing = False
                if graph is None:
                    self.remember(key, failed=True)
                else:
                    self.seen.pop(key, None)
                    entry = self.graphs[key] = (threading.Lock(), graph)
                    while len(self.graphs) > self.size:
                        self.graphs.popitem(last=False)
                first_failure = failure is not None and not self.warned
                self.warned = self.warned or first_failure
        if entry is None:
            if first_failure:
                shapes = ", ".join(str(list(tensor.shape)) for tensor in inputs)
                warnings.warn(
                    f"CUDA graph capture failed for inputs of shape {shapes} ({failure}); these shapes run "
                    "without a graph from now on, as will others whose capture fails",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return function(*inputs)
        return self.replay(entry, inputs)

    def remember(self, key: Hashable, failed: bool) -> None:
        """Note a key without a graph (the caller holds the lock); the oldest are forgotten."""
        self.seen[key] = failed
        self.seen.move_to_end(key)
        while len(self.seen) > 4 * self.size:
            self.seen.popitem(last=False)

    @staticmethod
    def replay(entry: tuple[threading.Lock, Graph], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        lock, graph = entry
        with lock:
            return graph.replay(inputs)
