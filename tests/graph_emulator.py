"""CUDA graph semantics on the CPU, for testing what a GPU would capture without one.

`EmulatedGraphs` has CudaGraphs' interface (graphed.py). Its `capture(work)` runs `work` once under a
TorchDispatchMode that records every aten op with its arguments as they were: tensors by identity
(a graph's fixed memory), Python numbers by value. The replay it returns runs those ops again on the
same tensors, writing each result where the op first wrote it. So, as on a GPU:

- a number computed on the host at capture (a learning rate, a decay, a random draw made with
  Python's `random`) is frozen, and a step that relies on one drifts from the eager step;
- a host sync inside the step (`.item()`, a Python branch on a tensor's value) is an error;
- random ops draw new numbers at each replay, in the eager step's order, from the generator they were
  given or, given none (dropout, timm's drop_path), from the default one, which PyTorch registers with
  every capture (CUDAGraph::capture_begin): a capture leaves it where it was, and each replay moves it on
  by what the step draws, as the eager step does;
- a tensor the capture did not make (the program's own memory) is held only weakly: replaying on one
  the program has let go of is an error, as its memory would be handed out again under the graph;
- collectives (DDP's gradient all-reduce, its buffer broadcast) run again at each replay, on every
  rank, as NCCL's captured ones do.

A real capture runs nothing, so the emulated one leaves every tensor it wrote and every generator it
drew from as it found them, also when it fails.

What it cannot show: where a GPU would run a host op once at capture and freeze its result (a draw
from the CPU's generator, copied to the device), as everything here is on the CPU; and a compiled model
(--compile), which Dynamo runs uncompiled under a TorchDispatchMode: the capture records its eager ops
while the warm-up ran Inductor's kernels, so a graphed --compile run differs from the eager one in the
last bits, here only.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncInCapture(AssertionError):
    pass


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def expanded(tensor: torch.Tensor) -> bool:
    """Whether elements share memory (an expand): nothing can write through such a tensor."""
    return any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape))


def write_into(recorded: Any, result: Any) -> None:
    """Put a replayed op's result where the op wrote at capture (in place: nothing to do)."""
    if isinstance(recorded, torch.Tensor):
        same_place = recorded.data_ptr() == result.data_ptr() and recorded.stride() == result.stride()
        if not same_place:
            recorded.copy_(result)
    elif isinstance(recorded, (list, tuple)):
        for recorded_item, result_item in zip(recorded, result):
            write_into(recorded_item, result_item)


class FreedUnderTheGraph(AssertionError):
    pass


class Borrowed:
    """A tensor that a captured op uses but that the capture did not make: the program owns it, and
    on a GPU its memory goes back to the allocator (to be handed out again, under the graph) once the
    program lets go of it. So the emulator holds it only weakly."""

    def __init__(self, tensor: torch.Tensor, func) -> None:
        self.tensor, self.func = weakref.ref(tensor), func

    def get(self) -> torch.Tensor:
        tensor = self.tensor()
        if tensor is None:
            raise FreedUnderTheGraph(f"{self.func} replays on a tensor the program has let go of since the "
                                     "capture: on a GPU the graph would use memory given to something else")
        return tensor


def borrowing(value: Any, made: dict[int, torch.Tensor], func) -> Any:
    """`value` with each tensor not made inside the capture held as a Borrowed."""
    if isinstance(value, torch.Tensor):
        return value if id(value) in made else Borrowed(value, func)
    if isinstance(value, (list, tuple)):
        return type(value)(borrowing(item, made, func) for item in value)
    if isinstance(value, dict):
        return {name: borrowing(item, made, func) for name, item in value.items()}
    return value


def lent(value: Any) -> Any:
    if isinstance(value, Borrowed):
        return value.get()
    if isinstance(value, (list, tuple)):
        return type(value)(lent(item) for item in value)
    return value


class Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.made: dict[int, torch.Tensor] = {}  # tensors the capture made (a graph's own memory)
        self.saved_tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.saved_generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        self.save_generator(torch.default_generator)  # what ops given no generator draw from (see above)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # the optimizer's record_function markers
            return func(*args, **kwargs)
        self.save_what_it_changes(func, args, kwargs)
        result = func(*args, **kwargs)
        if isinstance(result, (bool, int, float)):
            raise HostSyncInCapture(f"{func} hands a tensor's value to the host inside the captured step")
        given = {id(t) for t in tensors_in(list(args)) + tensors_in(list(kwargs.values()))}
        self.made.update((id(t), t) for t in tensors_in(result) if id(t) not in given)  # not an in-place op's
        self.ops.append((func, borrowing(args, self.made, func), borrowing(kwargs, self.made, func),
                         borrowing(result, self.made, func)))
        return result

    def save_what_it_changes(self, func, args, kwargs) -> None:
        """Keep every tensor and generator an op is given as it was when first given, to put back after
        the capture. All of them, not only those the op's schema marks as written: some ops write more
        than their schema says (native_batch_norm updates its running statistics unannotated)."""
        for position, argument in enumerate(func._schema.arguments):
            value = kwargs.get(argument.name, args[position] if position < len(args) else None)
            if isinstance(value, torch.Generator):
                self.save_generator(value)
            for tensor in tensors_in(value):
                if id(tensor) not in self.saved_tensors and not expanded(tensor):
                    self.saved_tensors[id(tensor)] = (tensor, tensor.detach().clone())

    def save_generator(self, generator: torch.Generator) -> None:
        if id(generator) not in self.saved_generators:
            self.saved_generators[id(generator)] = (generator, generator.get_state())

    def undo(self) -> None:
        for tensor, before in reversed(list(self.saved_tensors.values())):
            with torch.no_grad():
                tensor.copy_(before)
        for generator, state in self.saved_generators.values():
            generator.set_state(state)
        self.saved_tensors.clear()  # holding them would keep alive what the program lets go of

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, recorded in self.ops:
                result = func(*lent(args), **{name: lent(value) for name, value in kwargs.items()})
                if func.namespace == "c10d":  # a collective (DDP's all-reduce, its buffer broadcast)
                    finished(result)
                write_into(lent(recorded), result)


def finished(collective_result: tuple) -> None:
    """Wait for a collective to end, as the next op in a graph's stream order would (gloo's run on a
    thread of their own: the op returns its tensors and a Work to wait on)."""
    for item in collective_result:
        if isinstance(item, torch.ScriptObject) and hasattr(item, "wait"):
            item.wait()


class EmulatedGraphs:
    """CudaGraphs' interface (warm_up, capture) with the semantics above; counts its captures."""

    def __init__(self, generator: torch.Generator | None = None):
        self.captures = 0

    def side_stream(self) -> ContextManager[None]:
        return nullcontext()

    def warm_up(self, work: Callable):
        return work()

    def capture(self, work: Callable[[], None]) -> Callable[[], None]:
        recorder = Recorder()
        try:
            with recorder:
                work()
        finally:  # a capture that fails has run nothing either (the trainer then saves the state)
            recorder.undo()
        self.captures += 1
        return recorder.replay
