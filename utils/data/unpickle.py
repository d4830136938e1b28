"""Loading a torch file from an untrusted author: the allowlisted unpickler, pickle protocols other
than 2, and the checks that keep what was loaded as small as the file.

A record comes from whoever ran the attack, i.e. exactly the party a defender distrusts, and a
pickle can run any code while it is read. So files are loaded with torch's weights_only unpickler
and a scoped allowlist of the few numpy / PIL types BackdoorBench records contain; the unsafe loader
is only used behind the explicit --trust_record opt-in (a command-line flag, never a yaml key).

Three more things a hostile file could do inside the allowlist are stopped here:
  - constructors that allocate from a size the file states (numpy's _reconstruct, PIL's image
    state, tensors with stride 0 or a shape larger than their storage) would turn a few hundred
    bytes into gigabytes: the wrappers below and `check_loaded` bound every array by its bytes;
  - object arrays (dtype 'O', also inside a structured dtype) are refused however they are built;
  - torch's weights_only unpickler reads only protocol-2 opcodes, so files written with another
    pickle protocol are re-encoded to protocol 2 first (`as_protocol_2`), then read the same way.
"""
from __future__ import annotations

import _compat_pickle
import contextvars
import io
import logging
import math
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.core.errors import UserError, shown

try:  # numpy 2.x; numpy 1.x only has the old spelling
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _np_multiarray

log = logging.getLogger("backdoor")

_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
           np.uint64, np.float16, np.float32, np.float64, np.longdouble, np.complex64,
           np.complex128, np.str_, np.bytes_)

# Set by a wrapper below when it refuses something, so safe_load can report that instead of the
# generic unpickling error torch wraps it into.
_refusal: contextvars.ContextVar[str | None] = contextvars.ContextVar("refusal", default=None)


def _refuse(what: str):
    _refusal.set(what)
    raise pickle.UnpicklingError(what)


def _checked_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        _refuse("an object-dtype array (numpy dtype 'O' holds arbitrary Python objects)")
    return dtype


def _checked_reconstruct(cls, shape, dtype):
    """numpy pickles every array as _reconstruct(ndarray, (0,), 'b') and then sets its state with
    the real shape and bytes; a larger first shape would only allocate memory the file never
    fills."""
    dims = shape if isinstance(shape, tuple) else (shape,)
    if cls is not np.ndarray or not all(isinstance(d, int) for d in dims) or math.prod(dims):
        _refuse("a numpy array reconstructed with a preset shape (numpy itself writes (0,))")
    return _np_multiarray._reconstruct(cls, shape, _checked_dtype(dtype))


class RecordImage(Image.Image):
    """PIL.Image.Image as a record unpickles it: the pixel count is bounded by the bytes the file
    holds before PIL allocates the image (mode '1', one bit per pixel, is the densest)."""

    def __setstate__(self, state):
        ok = isinstance(state, (list, tuple)) and len(state) >= 5
        mode, size, data = (state[1], state[2], state[4]) if ok else (None, None, None)
        ok = ok and isinstance(mode, str) and isinstance(data, bytes) \
            and isinstance(size, (tuple, list)) and len(size) == 2 \
            and all(isinstance(s, int) and 0 <= s for s in size) \
            and size[0] * size[1] <= 8 * len(data)
        if not ok:
            _refuse("a PIL image whose size does not match its pixel data")
        super().__setstate__(state)
        self.record_state_set = True


def _checked_frombuffer(buffer, dtype, shape, order):
    """numpy's pickle-protocol-5 constructor: an array over the bytes the file holds."""
    array = np.frombuffer(buffer, dtype=_checked_dtype(dtype))
    return array.reshape(shape, order=order).copy(order=order)  # writable, like other arrays


def _checked_reconstructor(cls, base, state):
    """copyreg._reconstructor, which pickle protocols 0 and 1 use for PIL images: only that."""
    if cls is not RecordImage or base is not object or state is not None:
        _refuse("copyreg._reconstructor for something other than a PIL image")
    return RecordImage.__new__(RecordImage)


def _both_numpy_names(fn, name: str) -> list:
    """Records pickled under numpy 1.x name these functions 'numpy.core.*', numpy 2.x
    'numpy._core.*'; both map to the (checked) function."""
    return [(fn, f"{mod}.{name}") for mod in ("numpy.core", "numpy._core")]


# The concrete dtype classes are needed because unpickling a dtype ends in a BUILD on an instance of
# e.g. numpy.dtypes.Int64DType, which weights_only checks by type. Object dtype is left out, and
# numpy.dtype itself is the checked constructor. PIL.Image.Image maps to RecordImage: RAM-mode
# records pickle images as __newobj__(Image) + __setstate__([info, mode, size, palette, raw bytes]);
# images opened from files pickle as their plugin subclass, which is deliberately not allowlisted.
SAFE_GLOBALS = [np.ndarray, (_checked_dtype, "numpy.dtype"),
                *(type(np.dtype(t)) for t in _DTYPES),
                *_both_numpy_names(_checked_reconstruct, "multiarray._reconstruct"),
                *_both_numpy_names(_np_multiarray.scalar, "multiarray.scalar"),
                *_both_numpy_names(_checked_frombuffer, "numeric._frombuffer"),
                (RecordImage, "PIL.Image.Image"), (_checked_reconstructor, "copyreg._reconstructor"),
                (object, "builtins.object")]

# Where torch's weights_only errors name the thing they refused.
_REFUSED = re.compile(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>|unrecognized function (\S+)")


def safe_load(path, trust: bool = False):
    """torch.load onto the CPU; weights_only with the record allowlist unless `trust`, and every
    array and tensor checked by `check_loaded`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file {path} does not exist: check the record folder name and location")
    token = _refusal.set(None)
    try:
        if trust:
            log.warning("loading %s with --trust_record: unpickling may run code from whoever "
                        "made this file", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            loaded = torch.load(_protocol_2_file(path), map_location="cpu", weights_only=True)
        check_loaded(loaded, path)
        return loaded
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        refusal, found = _refusal.get(), _REFUSED.search(str(e))
        if refusal:
            raise UserError(f"{path}: the file builds {refusal}; the record is damaged or "
                            "malicious") from None
        if found and not trust:
            name = _python3_name(next(g for g in found.groups() if g))
            raise UserError(f"{path}: the record wants to run code ({name}) while loading; if you "
                            "trust its author, rerun with --trust_record") from None
        raise _corrupt(path, e) from None
    except Exception as e:  # truncated zip, EOF, junk bytes: torch raises many different types
        refusal = _refusal.get()
        if refusal:
            raise UserError(f"{path}: the file builds {refusal}; the record is damaged or "
                            "malicious") from None
        raise _corrupt(path, e) from None
    finally:
        _refusal.reset(token)


def _python3_name(name: str) -> str:
    """'commands.check_output' -> 'subprocess.check_output': pickle protocols up to 2 store some
    globals under their Python 2 names, which would hide what the record asked for."""
    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}" if module else attr


def _corrupt(path, e: Exception) -> UserError:
    # weights_only errors open with a paragraph of advice; the finding follows this marker.
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = shown(first.split(". ", 1)[0])  # torch's follow-up sentences are advice for itself
    return UserError(f"cannot read {path} ({type(e).__name__}: {detail}): the file is truncated "
                     "or corrupt; copy or regenerate it")


# ---------------------------------------------------------------- what was loaded

def check_loaded(obj, where) -> None:
    """Every tensor dense, contiguous and within its storage; no object arrays; every image
    unpickled with its pixels. Shared references are visited once (a pickle's memo can make a
    structure whose paths multiply, as YAML aliases do)."""
    seen, stack = set(), [obj]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, torch.Tensor):
            _check_tensor(node, where)
        elif isinstance(node, np.ndarray):
            if node.dtype.hasobject or not (node.flags.c_contiguous or node.flags.f_contiguous):
                raise UserError(f"{where}: an array of dtype {shown(node.dtype, 40)} or strides "
                                f"{node.strides} is not plain numeric data; the record is damaged "
                                "or malicious")
        elif isinstance(node, np.dtype) and node.hasobject:
            raise UserError(f"{where}: the file holds an object dtype; the record is damaged or "
                            "malicious")
        elif isinstance(node, Image.Image):
            if not node.__dict__.pop("record_state_set", False):
                raise UserError(f"{where}: the file holds a PIL image without pixel data; the "
                                "record is damaged")
            node.__class__ = Image.Image  # checked: from now on a plain image (also to re-save)


def _check_tensor(tensor: torch.Tensor, where) -> None:
    if tensor.layout != torch.strided:
        raise UserError(f"{where}: a {tensor.layout} tensor where records hold dense ones; the "
                        "record is damaged or malicious")
    needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
    if not tensor.is_contiguous() or needed > tensor.untyped_storage().nbytes():
        raise UserError(f"{where}: a tensor of shape {tuple(tensor.shape)} with strides "
                        f"{tensor.stride()} claims more elements than its storage holds; the "
                        "record is damaged or malicious")


# ---------------------------------------------------------------- pickle protocols

def _protocol_2_file(path: Path):
    """The path itself when its pickles are protocol 2 (what torch.save writes), else the file
    re-encoded in memory."""
    raw = path.read_bytes()
    if raw[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = archive.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl")), None)
            if pkl is None or archive.read(pkl)[:2] == b"\x80\x02":
                return path
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
                for name in names:
                    data = archive.read(name)
                    copy.writestr(name, as_protocol_2(data)[0] if name == pkl else data)
        out.seek(0)
        return out
    if raw[:2] == b"\x80\x02":
        return path
    parts, pos = [], 0  # the legacy format: magic, protocol, system info, object, storage keys
    for _ in range(5):
        part, pos = as_protocol_2(raw, pos)
        parts.append(part)
    return io.BytesIO(b"".join(parts) + raw[pos:])


def _put(index: int) -> bytes:
    return b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)


def _get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def _unicode(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = pickle.encode_long(value)
    return b"\x8a" + bytes([len(data)]) + data if len(data) < 256 else \
        b"\x8b" + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_STORAGE_ID = re.compile(r"\('storage', <class 'torch\.(\w+)'>, '(\w+)', '([\w:]+)', (\d+)(, None)?\)")
_KEPT = {"APPEND", "APPENDS", "BINFLOAT", "BININT", "BININT1", "BININT2", "BINPERSID", "BINUNICODE",
         "BUILD", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE", "LONG1", "MARK",
         "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE", "REDUCE", "SETITEM", "SETITEMS", "SHORT_BINSTRING",
         "STOP", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}
_MARK_USERS = {"TUPLE", "APPENDS", "SETITEMS", "DICT", "LIST"}


def as_protocol_2(data: bytes, start: int = 0) -> tuple[bytes, int]:
    """The pickle at data[start:] with only the opcodes torch's weights_only unpickler reads
    (protocol 2), and where it ended. Same objects, same globals: nothing is executed here, and
    the result goes through the same allowlist. An opcode without a protocol-2 equivalent that
    records could use raises UnpicklingError."""
    ops = list(pickletools.genops(io.BytesIO(memoryview(data)[start:])))
    out: list[bytes] = []
    marks: list[int] = []  # positions in `out` of the open MARKs
    strings: list[tuple[int, str, list[int]]] = []  # trailing string pushes: (position, text, puts)
    memo_text: dict[int, str] = {}  # memo slots holding strings
    dropped: dict[int, str] = {}  # memo slots whose string a STACK_GLOBAL consumed
    memo_next = 0
    for i, (op, arg, at) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else at + 1
        name, text = op.name, None
        if name in ("FRAME",):
            continue
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            index = memo_next if name == "MEMOIZE" else arg
            memo_next = max(memo_next, index + 1)
            if strings and strings[-1][0] == len(out) - 1:
                strings[-1][2].append(index)
                memo_text[index] = strings[-1][1]
            out.append(_put(index))
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            text = dropped.get(arg, memo_text.get(arg))
            out.append(_unicode(dropped[arg]) if arg in dropped else _get(arg))
        elif name in ("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"):
            text = arg
            out.append(_unicode(arg))
        elif name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise pickle.UnpicklingError("STACK_GLOBAL without its two names")
            (first, module, puts1), (_, attr, puts2) = strings[-2:]
            for index in puts1 + puts2:
                dropped[index] = memo_text[index]
            del out[first:]
            out.append(_global(module, attr))
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            out.append(_global(module, attr))
        elif name == "PROTO":
            out.append(b"\x80\x02")
        elif name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"):  # as protocol 2
            out.append(_global("_codecs", "encode") + _unicode(arg.decode("latin1"))
                       + _unicode("latin1") + b"\x86R")
        elif name == "INT":
            out.append(b"\x88" if arg is True else b"\x89" if arg is False else _int(arg))
        elif name in ("LONG", "LONG4"):
            out.append(_int(arg))
        elif name == "FLOAT":
            out.append(b"G" + struct.pack(">d", arg))
        elif name == "PERSID":  # protocol 0 writes torch's storage key as the text of a tuple
            found = _STORAGE_ID.fullmatch(arg)
            if not found:
                raise pickle.UnpicklingError(f"unexpected persistent id {arg[:80]!r}")
            kind, key, location, numel, view = found.groups()  # legacy files add a view slot
            out.append(b"(" + _unicode("storage") + _global("torch", kind) + _unicode(key)
                       + _unicode(location) + _int(int(numel)) + (b"N" if view else b"")
                       + b"tQ")
        elif name in ("DICT", "LIST"):  # MARK ... DICT == EMPTY_DICT MARK ... SETITEMS
            out.insert(marks.pop(), b"}" if name == "DICT" else b"]")
            out.append(b"u" if name == "DICT" else b"e")
        elif name in _KEPT:
            if name in _MARK_USERS:
                marks.pop()
            if name == "MARK":
                marks.append(len(out))
            out.append(bytes(data[start + at:start + end]))
        else:
            raise pickle.UnpicklingError(f"pickle opcode {name} is not supported in records")
        if text is None:
            strings = []
        else:
            strings.append((len(out) - 1, text, []))
        if name == "STOP":
            return b"".join(out), start + end
    raise pickle.UnpicklingError("pickle without STOP")
