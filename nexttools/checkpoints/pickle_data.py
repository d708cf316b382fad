"""A pickle *reader*: the plain data a pickle describes, without importing, calling or building anything.

``pickle.Unpickler`` (even one whose ``find_class`` allows a few classes) executes the file: it
resolves names with ``getattr`` on modules (which runs lazy imports), calls what REDUCE names, and
lets BUILD set attributes on whatever is on its stack, classes and functions included, which
changes the process for everyone. A DCP ``.metadata`` file is untrusted data, so it is read here
instead, opcode by opcode (the ``pickletools`` view), into plain values:

- ``None``, bools, ints, floats, ``str``, ``bytes``, tuples, lists and dicts, as themselves;
- a GLOBAL / STACK_GLOBAL as a :class:`Global` holding the two names, never resolved;
- a REDUCE / NEWOBJ / NEWOBJ_EX as an :class:`Instance` holding that Global and its arguments, and
  the state a BUILD gives it; nothing is called.

The caller then checks the shape it expects and builds its own objects. Bounded by construction:
every length is checked against the bytes that remain before anything is allocated, so memory is a
small multiple of the input; the nesting depth and cycles are checked before the value is returned
(iteratively: no recursion a deep file could overflow); any opcode outside this grammar (PERSID,
EXT, INST, OBJ, sets, protocol-0 text forms, out-of-band buffers) refuses the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting accepted; a DCP metadata pickle nests about 8 deep."""
MAX_INT_BYTES = 64
"""Longest LONG1/LONG4 integer accepted, in bytes: 512 bits, far beyond any size or offset."""


class PickleRefused(ValueError):
    """The data is not a pickle this reader accepts; the message says why."""


@dataclass(eq=False, frozen=True)
class Global:
    """A name a pickle refers to (``module``, ``name``); it is never imported."""

    module: str
    name: str


@dataclass(eq=False)
class Instance:
    """An object a pickle describes: ``cls(*args)`` (never called) and the ``state`` BUILD gives it."""

    cls: Global
    args: tuple[Any, ...]
    state: Any = field(default=None)


_MARK = object()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or n > len(self.data) - self.pos:
            raise PickleRefused(f"a field of {n} bytes at byte {self.pos} runs past the end of the file")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unsigned(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def line(self) -> str:
        end = bytes(self.data[self.pos : self.pos + 512]).find(b"\n")
        if end < 0:
            raise PickleRefused(f"an unterminated name at byte {self.pos}")
        text = bytes(self.take(end + 1)[:-1]).decode("utf-8", "strict")
        return text


def read_pickle(data: bytes) -> Any:
    """The value the pickle ``data`` describes, as plain data (module docstring); ``PickleRefused``
    (a ``ValueError``) when it is not one this grammar accepts."""
    try:
        value = _load(_Reader(data))
    except (UnicodeDecodeError, struct.error, TypeError) as error:  # bad text, unhashable keys...
        raise PickleRefused(f"malformed ({type(error).__name__})") from None
    _check_depth(value)
    return value


def _load(reader: _Reader) -> Any:
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise PickleRefused("an opcode needs a MARK that is not there")
        items, stack = stack, marks.pop()
        return items

    def pop() -> Any:
        if not stack:
            raise PickleRefused("an opcode needs a value the stack does not have")
        return stack.pop()

    while True:
        at = reader.pos
        op = bytes(reader.take(1))
        if op == b".":  # STOP
            if len(stack) != 1 or marks:
                raise PickleRefused("the pickle does not end with exactly one value")
            return stack[0]
        if op == b"\x80":  # PROTO
            reader.take(1)
        elif op == b"\x95":  # FRAME: a length hint only
            reader.take(8)
        elif op == b"(":
            marks.append(stack)
            stack = []
        elif op == b")":
            stack.append(())
        elif op == b"t":
            items = pop_mark()  # before naming `stack`: popping the MARK rebinds it
            stack.append(tuple(items))
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            n = op[0] - 0x84
            if len(stack) < n:
                raise PickleRefused("a TUPLE opcode needs values the stack does not have")
            packed = tuple(stack[-n:])
            del stack[-n:]
            stack.append(packed)
        elif op == b"]":
            stack.append([])
        elif op == b"l":
            items = pop_mark()
            stack.append(items)
        elif op == b"a":
            item = pop()
            _target(stack, list).append(item)
        elif op == b"e":
            items = pop_mark()
            _target(stack, list).extend(items)
        elif op == b"}":
            stack.append({})
        elif op == b"d":
            pairs = _pairs(pop_mark())
            stack.append(pairs)
        elif op == b"s":
            value, key = pop(), pop()
            _target(stack, dict)[key] = value
        elif op == b"u":
            pairs = _pairs(pop_mark())  # first: the dict is below the MARK
            _target(stack, dict).update(pairs)
        elif op == b"N":
            stack.append(None)
        elif op in (b"\x88", b"\x89"):
            stack.append(op == b"\x88")
        elif op == b"J":
            stack.append(int.from_bytes(reader.take(4), "little", signed=True))
        elif op == b"K":
            stack.append(reader.unsigned(1))
        elif op == b"M":
            stack.append(reader.unsigned(2))
        elif op in (b"\x8a", b"\x8b"):  # LONG1, LONG4
            n = reader.unsigned(1 if op == b"\x8a" else 4)
            if n > MAX_INT_BYTES:
                raise PickleRefused(f"an integer of {n} bytes")
            stack.append(int.from_bytes(reader.take(n), "little", signed=True))
        elif op == b"G":
            stack.append(struct.unpack(">d", reader.take(8))[0])
        elif op in (b"\x8c", b"X", b"\x8d"):  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            n = reader.unsigned({b"\x8c": 1, b"X": 4, b"\x8d": 8}[op])
            stack.append(bytes(reader.take(n)).decode("utf-8", "surrogatepass"))
        elif op in (b"C", b"B", b"\x8e"):  # SHORT_BINBYTES, BINBYTES, BINBYTES8
            n = reader.unsigned({b"C": 1, b"B": 4, b"\x8e": 8}[op])
            stack.append(bytes(reader.take(n)))
        elif op == b"c":
            stack.append(Global(reader.line(), reader.line()))
        elif op == b"\x93":  # STACK_GLOBAL
            name, module = pop(), pop()
            if not (isinstance(module, str) and isinstance(name, str)):
                raise PickleRefused("STACK_GLOBAL of something that is not two names")
            stack.append(Global(module, name))
        elif op in (b"R", b"\x81"):  # REDUCE, NEWOBJ
            args, cls = pop(), pop()
            stack.append(_instance(cls, args))
        elif op == b"\x92":  # NEWOBJ_EX
            kwargs, args, cls = pop(), pop(), pop()
            if kwargs not in ({}, None):
                raise PickleRefused("NEWOBJ_EX with keyword arguments")
            stack.append(_instance(cls, args))
        elif op == b"b":
            state = pop()
            target = _target(stack, Instance)
            if target.state is not None:
                raise PickleRefused("BUILD twice on one object")
            target.state = state
        elif op == b"\x94":  # MEMOIZE
            memo[len(memo)] = _top(stack)
        elif op in (b"q", b"r"):  # BINPUT, LONG_BINPUT
            memo[reader.unsigned(1 if op == b"q" else 4)] = _top(stack)
        elif op in (b"h", b"j"):  # BINGET, LONG_BINGET
            index = reader.unsigned(1 if op == b"h" else 4)
            if index not in memo:
                raise PickleRefused(f"memo entry {index} is read before it is written")
            stack.append(memo[index])
        else:
            raise PickleRefused(f"opcode {op!r} at byte {at} is not part of plain metadata")


def _top(stack: list[Any]) -> Any:
    if not stack:
        raise PickleRefused("MEMOIZE with an empty stack")
    return stack[-1]


def _target(stack: list[Any], kind: type) -> Any:
    """The value an APPEND/SETITEM/BUILD changes: the stack's top, which must be a ``kind``."""
    if not stack or not isinstance(stack[-1], kind):
        raise PickleRefused(f"an opcode changes something that is not a {kind.__name__}")
    return stack[-1]


def _pairs(items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise PickleRefused("a dict of an odd number of items")
    return {items[i]: items[i + 1] for i in range(0, len(items), 2)}


def _instance(cls: Any, args: Any) -> Instance:
    if not isinstance(cls, Global) or not isinstance(args, tuple):
        raise PickleRefused("REDUCE/NEWOBJ of something that is not a name and an argument tuple")
    return Instance(cls, args)


def _children(value: Any) -> tuple[Any, ...] | list[Any] | None:
    """The values ``value`` holds, or None for a leaf."""
    if isinstance(value, tuple | list):
        return value
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, Instance):
        return (value.args, value.state)
    return None


def _check_depth(root: Any) -> None:
    """Refuse a value nested deeper than :data:`MAX_DEPTH` or holding itself. A walk with an explicit
    stack (no recursion); a value shared by several parents is walked once, its height remembered, so
    that it counts at every depth where it appears."""
    heights: dict[int, int] = {}  # finished values: 1 + the height of their tallest child
    on_path: set[int] = set()
    walk: list[tuple[Any, Any, int]] = []  # (value, its remaining children, tallest child so far)

    def reach(value: Any) -> int | None:
        """The height of ``value`` if known (a leaf, or finished), else start walking it (None)."""
        children = _children(value)
        if children is None:
            return 0
        if id(value) in heights:
            return heights[id(value)]
        if id(value) in on_path:
            raise PickleRefused("a value that holds itself")
        on_path.add(id(value))
        walk.append((value, iter(children), 0))
        return None

    def settle(height: int) -> None:
        if len(walk) + height > MAX_DEPTH:
            raise PickleRefused(f"values nested deeper than {MAX_DEPTH}")
        value, children, tallest = walk[-1]
        walk[-1] = (value, children, max(tallest, height))

    reach(root)
    while walk:
        value, children, tallest = walk[-1]
        child = next(children, _MARK)
        if child is not _MARK:
            height = reach(child)
            if height is not None:
                settle(height)
            continue
        walk.pop()
        on_path.discard(id(value))
        heights[id(value)] = tallest + 1
        if walk:
            settle(tallest + 1)
