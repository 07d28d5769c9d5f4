"""The tensors a user callable (score_mod, mask_mod) reads from outside its arguments, made explicit.

A score_mod such as ``lambda s, b, h, i, j: s + table[h]`` closes over ``table``. An engine that computes
attention tile by tile (and recomputes tiles in its backward) must treat ``table`` like any other input: save
it for the backward (so that an in-place change between forward and backward is caught by autograd's version
counter) and return its gradient to autograd (so that ``torch.autograd.grad(out, (q, table))`` works and
``table = 2 * param`` over many tiles differentiates once). :func:`lift` finds such tensors — in the function's
closure cells (and those of functions it closes over), its default arguments and the module globals it names
— and gives a way to rebuild the function with other tensors in their place (detached copies in the
forward, grad-requiring leaves in the backward).
"""
from __future__ import annotations

import types
from collections.abc import Callable

import torch

__all__ = ["Lifted", "lift"]

_MAX_DEPTH = 4


class Lifted:
    """A callable with its captured tensors taken out: ``tensors`` (a tuple) and ``bind(tensors)`` -> the
    callable reading those tensors instead. ``complete`` is False when the callable is not a plain Python
    function (a bound method, a callable object, a builtin): then its tensors cannot be found."""

    __slots__ = ("fn", "tensors", "_slots", "complete")

    def __init__(self, fn: Callable, tensors: tuple, slots: list, complete: bool):
        self.fn, self.tensors, self._slots, self.complete = fn, tensors, slots, complete

    def bind(self, tensors) -> Callable:
        if not self._slots:
            return self.fn
        it = iter(tensors)
        return _rebuild(self.fn, self._slots, it)


def lift(fn: Callable) -> Lifted:
    """The tensors ``fn`` reads from its closure, defaults and globals (see the module docstring)."""
    found: list = []
    slots, complete = _find(fn, found, 0)
    return Lifted(fn, tuple(found), slots, complete)


def _find(fn, found: list, depth: int):
    """Slots of ``fn`` holding tensors (appending the tensors to ``found`` in slot order), and whether fn was
    inspectable all the way down."""
    if not isinstance(fn, types.FunctionType):
        return [], False
    slots, complete = [], True
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            c = cell.cell_contents
        except ValueError:                     # an empty cell (a name bound later)
            continue
        if isinstance(c, torch.Tensor):
            slots.append(("cell", i, None))
            found.append(c)
        elif isinstance(c, types.FunctionType) and depth < _MAX_DEPTH:
            sub, ok = _find(c, found, depth + 1)
            complete &= ok
            if sub:
                slots.append(("cellfn", i, sub))
    for i, d in enumerate(fn.__defaults__ or ()):
        if isinstance(d, torch.Tensor):
            slots.append(("default", i, None))
            found.append(d)
    g = fn.__globals__
    for name in fn.__code__.co_names:
        if isinstance(g.get(name), torch.Tensor):
            slots.append(("global", name, None))
            found.append(g[name])
    return slots, complete


def _rebuild(fn, slots, it):
    closure = list(fn.__closure__ or ())
    defaults = list(fn.__defaults__ or ())
    overrides = {}
    for kind, key, sub in slots:
        if kind == "cell":
            closure[key] = types.CellType(next(it))
        elif kind == "cellfn":
            closure[key] = types.CellType(_rebuild(closure[key].cell_contents, sub, it))
        elif kind == "default":
            defaults[key] = next(it)
        else:
            overrides[key] = next(it)
    glob = fn.__globals__ if not overrides else {**fn.__globals__, **overrides}
    new = types.FunctionType(fn.__code__, glob, fn.__name__, tuple(defaults) if fn.__defaults__ else None,
                             tuple(closure) if fn.__closure__ else None)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new
