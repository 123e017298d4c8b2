"""Where a training step makes the host wait for the GPU (a host sync), by call site.

A sync stops the CPU from queueing kernels ahead: the GPU then idles while the CPU catches up
(the gaps bench/gpu/idle.py finds in a profiled step). Two detectors, one report:

  - on a GPU, torch.cuda.set_sync_debug_mode("warn"): torch warns at every synchronizing call
    (.item(), nonzero, a copy to or from pageable host memory, ...); the warnings are caught and
    grouped by the innermost frame outside torch;
  - anywhere (CPU included, so CI runs this code), a dispatch mode that records the operators
    that sync when their input is on a GPU (SYNC_OPS), and the tensor methods that read values on
    the host (HOST_READS). On CPU it cannot see copies between host and device (there are none),
    which the GPU detector does.

    with found() as syncs:
        step()
    syncs  # [{"op": "aten.nonzero.default", "where": "base.py:101 trim_text_padding", "count": 1}, ...]
"""
from __future__ import annotations

import collections
import contextlib
import os
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# operators that read a GPU tensor's value on the host (or size their output by it)
SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default",  # .item(), float(t), int(t), bool(t)
    "aten.is_nonzero.default",            # `if t:`
    "aten.nonzero.default",
    "aten.equal.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
})
HOST_READS = ("tolist", "numpy")
# frames inside these are not the call site a person would change
_LIBRARY = (os.sep + "torch" + os.sep, os.sep + "contextlib.py", os.sep + "warnings.py", __file__)


def call_site(stack: list) -> str:
    """The innermost frame outside torch (and this file): 'file.py:line function'."""
    for f in reversed(stack):
        if not any(part in f.filename for part in _LIBRARY):
            return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
    return "torch"


class _Finder(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNC_OPS:
            self.counts[(str(func), call_site(traceback.extract_stack()[:-1]))] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _host_reads(counts: collections.Counter):
    """Tensor methods that read values on the host without an operator the dispatch mode sees on
    CPU (tolist, numpy: a device-to-host copy on a GPU), recorded while inside."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, method):
        def read(self, *args, **kwargs):
            counts[(f"Tensor.{name}", call_site(traceback.extract_stack()[:-1]))] += 1
            return method(self, *args, **kwargs)
        return read
    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, wrap(name, method))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def is_sync_warning(message: str) -> bool:
    """A warning torch's sync debug mode gives at a synchronizing call, not its notice on being
    switched on ("Synchronization debug mode is a prototype feature ...", which the sixth GPU run
    counted as a sync at the line that switched it on). Pure."""
    return "synchroniz" in message.lower() and "debug mode" not in message.lower()


@contextlib.contextmanager
def found(ignore: tuple[str, ...] = ()):
    """Collect the host syncs of the code run inside, as a list filled in on exit; call sites
    containing any of `ignore` are left out. On a GPU torch's sync warnings (which see copies
    too, and leave compiled code as it is), elsewhere the dispatch mode."""
    out: list[dict] = []
    counts: collections.Counter = collections.Counter()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()

    def show(message, category, filename, lineno, file=None, line=None):  # called where the op syncs
        if is_sync_warning(str(message)):
            counts[("cuda: " + str(message).split("\n")[0][:60], call_site(traceback.extract_stack()[:-1]))] += 1

    with warnings.catch_warnings(), (contextlib.nullcontext() if cuda else _Finder(counts)), \
            (contextlib.nullcontext() if cuda else _host_reads(counts)):
        warnings.simplefilter("always")
        warnings.showwarning = show
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield out
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    for (op, where), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if not any(s in where for s in ignore):
            out.append({"op": op, "where": where, "count": n})
