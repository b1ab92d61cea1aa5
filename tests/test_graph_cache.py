"""`cuda_graphs.CudaGraphCache`'s bookkeeping, on the CPU: a stand-in capture takes the place of CUDA
graphs, so that eager first calls, failed and slow captures, and threads sharing one graph are
tested without a GPU. tests/test_cuda.py tests the CUDA graphs themselves."""

import gc
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from cuda_graphs import CudaGraphCache

KEY = "weights"  # what `synthesize` passes: a fingerprint of the weights
PATIENCE = 60.0  # seconds a stand-in waits for the test to release it: only reached if the cache blocked


class StandInGraph:
    """A captured graph as the cache sees it, on the CPU: `function` run on fixed input tensors into
    a fixed output tensor, as a CUDA graph replays. It lets other threads run between writing the
    inputs and reading the output, as a GPU would: two replays at once would mix their results."""

    def __init__(self, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        self.function = function
        self.inputs = tuple(tensor.clone() for tensor in inputs)
        self.output = function(*self.inputs)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, tensor in zip(self.inputs, inputs, strict=True):
            static.copy_(tensor)
        time.sleep(1e-4)
        self.output.copy_(self.function(*self.inputs))
        time.sleep(1e-4)
        return self.output.clone()


def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_a_shape_runs_eagerly_then_is_captured_then_replayed():
    captures = []

    def capture(function, inputs):
        captures.append(inputs[0].shape[0])
        return StandInGraph(function, inputs)

    cache = CudaGraphCache(size=2, capture=capture)
    for length, expected_captures in [
        (4, []),
        (4, [4]),
        (4, [4]),
        (5, [4]),
        (5, [4, 5]),
        (6, [4, 5]),
        (6, [4, 5, 6]),  # one graph too many: 4's, the least recently used, goes out
        (4, [4, 5, 6]),  # so 4 starts again, eagerly
        (4, [4, 5, 6, 4]),
        (6, [4, 5, 6, 4]),
    ]:
        x = torch.randn(length)
        assert torch.equal(cache(double, (x,), KEY), 2 * x)
        assert captures == expected_captures
    assert len(cache.graphs) == 2
    x = torch.randn(4)
    assert torch.equal(cache(double, (x,), "other weights"), 2 * x) and len(captures) == 4  # a new key: eager


def test_a_failed_capture_falls_back_to_eager_warns_once_and_is_not_retried():
    attempts = []

    def failing_capture(function, inputs):
        attempts.append(inputs[0].shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cache = CudaGraphCache(capture=failing_capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in (4, 4, 4, 4, 5, 5, 5):
            x = torch.randn(length)
            assert torch.equal(cache(double, (x,), KEY), 2 * x)
    assert attempts == [4, 5]  # one attempt per shape, none after it failed
    assert [warning.category for warning in caught] == [RuntimeWarning]
    assert "CUDA graph capture failed for inputs of shape [4] (OutOfMemoryError: CUDA out of memory" in str(
        caught[0].message
    )
    assert not cache.graphs
    cache.capture = StandInGraph  # a failure does not keep other shapes from being captured
    for _ in range(2):
        cache(double, (torch.randn(6),), KEY)
    assert len(cache.graphs) == 1


def test_a_failed_capture_releases_its_memory_before_the_eager_call():
    pools = []

    def failing_capture(function, inputs):
        pool = torch.empty(16)  # stands for the graph's memory pool, held by this frame
        pools.append(weakref.ref(pool))
        raise torch.OutOfMemoryError("CUDA out of memory")

    held_during_eager_call = []

    def function(x):
        held_during_eager_call.extend(ref() is not None for ref in pools)
        return 2 * x

    cache = CudaGraphCache(capture=failing_capture)
    gc.disable()  # reference counts alone must free it: a cycle would hold it until the next collection
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                cache(function, (torch.randn(4),), KEY)
    finally:
        gc.enable()
    assert len(pools) == 1 and held_during_eager_call == [False]


def test_a_slow_capture_blocks_no_other_shape():
    started, release = threading.Event(), threading.Event()
    released = []

    def slow_capture(function, inputs):
        if inputs[0].shape[0] == 5:
            started.set()
            released.append(release.wait(PATIENCE))
        return StandInGraph(function, inputs)

    cache = CudaGraphCache(capture=slow_capture)
    captured, slow, new = torch.randn(4), torch.randn(5), torch.randn(6)
    for x in (captured, captured, slow):  # 4: eager, captured; 5: eager
        cache(double, (x,), KEY)
    with ThreadPoolExecutor(1) as pool:
        capturing = pool.submit(cache, double, (slow,), KEY)  # 5: captured, slowly
        assert started.wait(PATIENCE)
        # While 5 is being captured, a captured shape replays, 5 runs eagerly, and a new shape runs eagerly
        # twice (one capture at a time): none of them waits for the capture.
        assert torch.equal(cache(double, (captured,), KEY), 2 * captured)
        assert torch.equal(cache(double, (slow,), KEY), 2 * slow)
        for _ in range(2):
            assert torch.equal(cache(double, (new,), KEY), 2 * new)
        release.set()
        assert torch.equal(capturing.result(), 2 * slow)
    assert released == [True]  # had a call above waited for the capture, the capture would have timed out first
    assert len(cache.graphs) == 2
    assert torch.equal(cache(double, (new,), KEY), 2 * new) and len(cache.graphs) == 3  # 6's turn came


def test_a_new_shapes_first_call_blocks_no_other_shape():
    started, release = threading.Event(), threading.Event()
    released = []

    def slow_for_length_5(x):
        if x.shape[0] == 5 and not started.is_set():
            started.set()
            released.append(release.wait(PATIENCE))
        return 2 * x

    cache = CudaGraphCache(capture=StandInGraph)
    captured, slow = torch.randn(4), torch.randn(5)
    for _ in range(2):
        cache(slow_for_length_5, (captured,), KEY)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(cache, slow_for_length_5, (slow,), KEY)
        assert started.wait(PATIENCE)
        assert torch.equal(cache(slow_for_length_5, (captured,), KEY), 2 * captured)
        release.set()
        assert torch.equal(first.result(), 2 * slow)
    assert released == [True]


def test_threads_replaying_one_graph_each_get_their_own_result():
    cache = CudaGraphCache(capture=StandInGraph)
    for _ in range(2):  # eager, captured
        cache(double, (torch.zeros(64),), KEY)
    start = threading.Barrier(2)

    def replays(value: float) -> list[torch.Tensor]:
        x = torch.full((64,), value)
        start.wait()
        return [cache(double, (x,), KEY) for _ in range(50)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(replays, (1.0, 2.0)))
    assert len(cache.graphs) == 1
    for value, outputs in zip((1.0, 2.0), results, strict=True):
        for output in outputs:
            assert torch.equal(output, torch.full((64,), 2 * value))
