"""One kernel-level call, two ways in: a ``torch.library`` custom op and a lean eager path.

Every public op ends in a :class:`KernelOp`: a plain Python ``impl(*args, backend)`` that calls
the chosen backend's kernel-level op (``torch.ops.mixkernels_C.<name>`` or the Triton launcher
``mixkernels.triton.<family>.<name>``). The same ``impl`` is registered as the custom op
``mixkernels::<name>`` with a fake (meta) function and, when differentiable, its autograd.

* Under ``torch.compile`` / ``torch.export``, with fake or functional tensors, or while a
  ``TorchDispatchMode`` is active (opcheck, make_fx), the call goes through the custom op, so
  graphs see one opaque ``mixkernels::<name>`` node with a fake implementation.
* In plain eager mode it calls ``impl`` directly, inside a ``torch.autograd.Function`` when
  grad mode is on. The custom-op path costs 14 us (mix_tokens) to 60 us (window_attention,
  15 arguments) per call over ``impl`` on CPU (argument normalization against the schema, a
  setup_context Function); this path costs 2.5-4 us. Both
  run the same ``impl``, the same ``setup`` and the same ``backward``, so results are
  identical (tests/test_registry.py checks it for every op).

Arguments are named: ``setup`` stores the non-tensor arguments as a namedtuple (``ctx.attrs``)
and the tensors to keep by name (:meth:`KernelOp.saved`); ``backward`` returns gradients by
input name (:meth:`KernelOp.grads`). Adding an argument means adding it to ``impl``'s
signature (and the kernel's); no positional index anywhere.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import typing
from collections import namedtuple
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["KernelOp", "custom_op_path", "record_calls"]

_PLAIN = (Tensor, torch.nn.Parameter)
_FORCE_CUSTOM_OP = False
_RECORD: Optional[List[Tuple["KernelOp", tuple]]] = None


@contextlib.contextmanager
def custom_op_path() -> Iterator[None]:
    """Route every call through the ``torch.library`` custom ops, as under compile (for tests)."""
    global _FORCE_CUSTOM_OP
    old, _FORCE_CUSTOM_OP = _FORCE_CUSTOM_OP, True
    try:
        yield
    finally:
        _FORCE_CUSTOM_OP = old


@contextlib.contextmanager
def record_calls() -> Iterator[List[Tuple["KernelOp", tuple]]]:
    """Collect ``(KernelOp, args)`` of every call made inside (opcheck samples, overhead bench)."""
    global _RECORD
    old, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = old


def _getter(idx: Sequence[int]) -> Callable[[tuple], tuple]:
    """A C-level ``lambda t: tuple(t[i] for i in idx)``."""
    if not idx:
        return lambda t: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda t: (t[i],)
    return operator.itemgetter(*idx)


def _is_tensor_hint(h) -> bool:
    return h is Tensor or h == Optional[Tensor]


class KernelOp:
    """``impl(*args)`` registered as ``mixkernels::<name>``, callable through either path.

    Args:
        name: custom op name (``mixkernels::<name>``), also the Function's name in graphs.
        impl: the implementation with typed arguments (its signature is the schema).
        fake: shapes/dtypes of the outputs from the arguments (``register_fake``).
        outputs: output names, for :meth:`saved` / :meth:`autograd`.
    """

    def __init__(self, name: str, impl: Callable, fake: Callable, outputs: Sequence[str] = ("out",)):
        self.name = name
        self.impl = impl
        self.names = tuple(inspect.signature(impl).parameters)
        self.index: Dict[str, int] = {n: i for i, n in enumerate(self.names)}
        hints = typing.get_type_hints(impl)
        self.attr_names = tuple(n for n in self.names if not _is_tensor_hint(hints[n]))
        self._attr_idx = tuple(self.index[n] for n in self.attr_names)
        self.Attrs = namedtuple(f"{name}_attrs", self.attr_names)
        self.outputs = tuple(outputs)
        self.op = torch.library.custom_op(f"mixkernels::{name}", mutates_args=())(impl)
        self.op.register_fake(fake)
        self._function = None  # the eager torch.autograd.Function, once differentiable
        self._apply = None
        self._user_backward: Optional[Callable] = None

    # ------------------------------------------------------------------ calling
    def __call__(self, *args):
        if _RECORD is not None:
            _RECORD.append((self, args))
        if (_FORCE_CUSTOM_OP or torch.compiler.is_compiling() or type(args[0]) not in _PLAIN
                or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()):
            return self.op(*args)
        if self._apply is not None and torch.is_grad_enabled():
            return self._apply(*args)
        return self.impl(*args)

    def call(self, **kwargs):
        """Call with every argument named (backward ops, where clarity beats a few us)."""
        return self(*(kwargs[n] for n in self.names))

    # ------------------------------------------------------------------ autograd
    def autograd(self, backward: Callable, *, save: Sequence[str] = (), non_differentiable: Sequence[str] = (),
                 extra: Optional[Callable] = None) -> None:
        """Make the op differentiable: ``save`` names the input/output tensors ``backward``
        needs (:meth:`saved`), ``non_differentiable`` the outputs without a gradient, and
        ``extra(ctx, args)`` (args: the inputs by name) may keep more on ``ctx``.
        ``backward(ctx, *grad_outputs)`` returns :meth:`grads` and reads ``ctx.attrs``."""
        # Indices into inputs + outputs, gathered by C-level itemgetters in _setup (every call).
        n = len(self.names)
        pool = tuple(self.index[k] if k in self.index else n + self.outputs.index(k) for k in save)
        self._save = _getter(pool)
        self._attrs = _getter(self._attr_idx)
        self.Saved = namedtuple(f"{self.name}_saved", save)
        self._nondiff = tuple(self.outputs.index(k) for k in non_differentiable)
        self._extra = extra
        self.Args = namedtuple(f"{self.name}_args", self.names)
        self._user_backward = backward
        self.op.register_autograd(backward, setup_context=self._setup)
        op = self

        def forward(ctx, *args):
            out = op.impl(*args)
            op._setup(ctx, args, out)
            return out

        # Old-style forward(ctx, ...): with setup_context, Function.apply binds default arguments
        # through inspect.signature on every call (~8 us).
        self._function = type(self.name, (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(lambda ctx, *grads: op._user_backward(ctx, *grads)),
        })
        # Function.apply's Python wrapper only unwraps functorch wrappers (~5 us); __call__
        # takes this path only when no functorch transform is active, so call the C apply.
        self._apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, self._function)

    def _setup(self, ctx, inputs, output) -> None:
        outs = output if type(output) is tuple else (output,)
        ctx.attrs = tuple.__new__(self.Attrs, self._attrs(inputs))
        ctx.save_for_backward(*self._save(inputs + outs))
        if self._nondiff:
            ctx.mark_non_differentiable(*(outs[i] for i in self._nondiff))
        if self._extra is not None:
            self._extra(ctx, self.Args(*inputs))

    def saved(self, ctx):
        """The saved tensors, by name."""
        return self.Saved(*ctx.saved_tensors)

    def needs(self, ctx, name: str) -> bool:
        """Whether input ``name`` needs a gradient. (The dispatcher drops trailing arguments equal to
        their defaults from custom-op calls, so ``needs_input_grad`` may be shorter: those need none.)"""
        i, nig = self.index[name], ctx.needs_input_grad
        return i < len(nig) and nig[i]

    def grads(self, **by_name) -> tuple:
        """One gradient slot per input, ``None`` except the named ones."""
        out = [None] * len(self.names)
        for n, g in by_name.items():
            out[self.index[n]] = g
        return tuple(out)
