"""A hostile and malformed checkpoint corpus, generated here (nothing downloaded), against every loader of the package
(issue 23).

Containers: raw pickles, ``torch.save`` zip archives and legacy (pre-1.6) files, score_sde and NCSNv2 containers, EDM
persistence pickles, guided-diffusion and EDM state_dicts, safetensors (built-in prior, state_dicts, classifiers) and
YAML/JSON configs. Payloads are injected with ``fickling`` and written opcode by opcode: GLOBAL / STACK_GLOBAL of
``os.system``, ``subprocess.*``, ``builtins.eval/exec/getattr``, ``importlib.import_module`` ..., through REDUCE, INST,
OBJ, NEWOBJ / NEWOBJ_EX + BUILD with ``__setstate__``, persistent ids and memo tricks; pickles hidden in a zip's
records and in tensor storages; EDM's embedded module source; truncated and bit-flipped files; safetensors headers
fuzzed with hypothesis; YAML with Python tags. Every payload, if it ever ran, would create its own sentinel file.

For every file and every entry point (``load_prior`` detecting the format, ``load_prior(format=...)`` for each
registered format, ``load_classifier``, ``load_cifar10`` for raw pickles, ``read_config`` for configs): no sentinel
appears, the load raises a ValueError (FileNotFoundError for a missing config) naming the file and a reason, and peak
memory and time stay bounded, also for files claiming terabytes. Every file that fickling or picklescan calls unsafe
is refused. Nothing here unpickles a corpus file except the loaders under test: the corpus is written by hand or by
``pickle.dump`` / ``torch.save`` of our own objects, and inspected only with ``pickletools.genops`` (which decodes
opcodes, executing none) and the scanners.

The figures (files per container, payloads, sentinels, scanner verdicts, peak memory) are attached to the report with
``record_testsuite_property`` (``pytest --junitxml=FILE``); a failure prints them.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import json
import os
import pickle
import pickletools
import random
import re
import shutil
import struct
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from benchmarks.data import load_cifar10
from benchmarks.models import MnistCNN, load_classifier
from purifiers import load_prior
from purifiers.nets import edm
from purifiers.priors.checkpoints import FORMATS
from purifiers.priors.checkpoints.registry import read_config
from purifiers.priors.loading import BUILTIN_FORMAT, save_builtin_prior
from tiny import tiny_prior

# torch warns about the protocols and TorchScript look of hostile files it is about to refuse.
pytestmark = [pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
              pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript")]

MIN_FILES = 200
PEAK_MB = 64  # the most any file may raise the process's peak resident memory, all its loads together
HUGE_SECONDS = 5.0  # a file claiming terabytes must be refused within this (all its loads, a shared 2-core machine)
FILE_SECONDS = 20.0


# ---------------------------------------------------------------------------------------------------------------------
# A pickle assembler: hostile programs written opcode by opcode (pickletools names the opcodes used)

@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    func: object  # a Global, or a Call returning a callable
    args: tuple = ()


def _line(text: str) -> bytes:
    """A protocol-0 text argument (escaped as pickle escapes it)."""
    return text.replace("\\", "\\u005c").replace("\n", "\\u000a").encode("raw_unicode_escape") + b"\n"


class _Writer:
    """Opcodes for values and calls at one protocol: 0 (text), 1-3 (binary, GLOBAL) or 4 (STACK_GLOBAL)."""

    def __init__(self, protocol: int):
        self.protocol = protocol

    def value(self, v) -> bytes:
        if isinstance(v, Global):
            return self.global_(v)
        if isinstance(v, Call):
            return self.value(v.func) + self.args(v) + b"R"  # REDUCE
        if isinstance(v, str):
            if self.protocol == 0:
                return b"V" + _line(v)  # UNICODE
            data = v.encode()
            return (b"\x8c" + bytes([len(data)]) if self.protocol >= 4 and len(data) < 256  # SHORT_BINUNICODE
                    else b"X" + struct.pack("<I", len(data))) + data  # BINUNICODE
        if isinstance(v, bytes):
            if self.protocol >= 3:
                return b"B" + struct.pack("<I", len(v)) + v  # BINBYTES
            return self.value(Call(Global("_codecs", "encode"), (v.decode("latin1"), "latin1")))  # protocol 2's way
        if isinstance(v, int):
            return b"I" + str(v).encode() + b"\n"  # INT
        if isinstance(v, list):
            items = b"".join(self.value(x) for x in v)
            return b"(" + items + b"l" if self.protocol == 0 else b"](" + items + b"e"  # LIST / EMPTY_LIST APPENDS
        raise TypeError(type(v))

    def args(self, call: Call) -> bytes:
        return b"(" + b"".join(self.value(a) for a in call.args) + b"t"  # MARK .. TUPLE

    def global_(self, g: Global) -> bytes:
        if self.protocol >= 4:
            return self.value(g.module) + self.value(g.name) + b"\x93"  # STACK_GLOBAL
        return b"c" + g.module.encode() + b"\n" + g.name.encode() + b"\n"  # GLOBAL

    def program(self, body: bytes) -> bytes:
        body += b"."  # STOP
        if self.protocol >= 4:
            body = b"\x95" + struct.pack("<Q", len(body)) + body  # FRAME
        return (b"\x80" + bytes([self.protocol]) if self.protocol >= 2 else b"") + body  # PROTO


# How a payload call reaches the unpickler: each returns a whole pickle, or None where the opcode cannot express it.
def _enc_reduce_p0(c):
    return _Writer(0).program(_Writer(0).value(c))


def _enc_reduce_p2(c):
    return _Writer(2).program(_Writer(2).value(c))


def _enc_stack_global_p4(c):
    return _Writer(4).program(_Writer(4).value(c))


def _enc_inst(c):  # INST: MARK args INST module name (calls any callable, not only classes)
    if not isinstance(c.func, Global):
        return None
    w = _Writer(0)
    return w.program(b"(" + b"".join(w.value(a) for a in c.args) + b"i" + _line(c.func.module) + _line(c.func.name))


def _enc_obj(c):  # OBJ: MARK callable args OBJ
    w = _Writer(1)
    return w.program(b"(" + w.value(c.func) + b"".join(w.value(a) for a in c.args) + b"o")


def _enc_memo_binput(c):  # the callable parked in the memo, popped, fetched back later
    w = _Writer(2)
    return w.program(w.value(c.func) + b"q\x07" + b"0" + b"}0" + b"h\x07" + w.args(c) + b"R")


def _enc_memo_long(c):
    w = _Writer(2)
    return w.program(w.value(c.func) + b"r" + struct.pack("<I", 70000) + b"0" + b"]0"
                     + b"j" + struct.pack("<I", 70000) + w.args(c) + b"R")


def _enc_memo_text(c):
    w = _Writer(0)
    return w.program(w.value(c.func) + b"p9\n0" + b"(l0" + b"g9\n" + w.args(c) + b"R")


def _enc_memoize_p4(c):
    w = _Writer(4)
    return w.program(w.value(c.func) + b"\x94" + b"0" + b"}0" + b"h\x00" + w.args(c) + b"R")


def _enc_memo_overwrite(c):  # memo 0 first holds an allowed global, then the payload's callable
    w = _Writer(2)
    return w.program(w.global_(Global("collections", "OrderedDict")) + b"q\x000" + w.value(c.func) + b"q\x000"
                     + b"h\x00" + w.args(c) + b"R")


def _enc_persistent_id(c):  # the call runs while the persistent id tuple is built
    w = _Writer(2)
    return w.program(b"(" + w.value("storage") + w.value(c) + w.value("0") + w.value("cpu") + w.value(6) + b"tQ")


def _enc_setstate(c):  # NEWOBJ a namespace, BUILD {'__setstate__': callable}, then BUILD arg calls callable(arg)
    if len(c.args) != 1:
        return None
    w = _Writer(2)
    return w.program(w.global_(Global("types", "SimpleNamespace")) + b")\x81" + b"}" + w.value("__setstate__")
                     + w.value(c.func) + b"sb" + w.value(c.args[0]) + b"b")


def _enc_setstate_ex(c):  # the same through NEWOBJ_EX
    if len(c.args) != 1:
        return None
    w = _Writer(4)
    return w.program(w.global_(Global("argparse", "Namespace")) + b")}\x92" + b"}" + w.value("__setstate__")
                     + w.value(c.func) + b"sb" + w.value(c.args[0]) + b"b")


def _enc_nested(c):  # deep inside an innocent-looking checkpoint dict
    w = _Writer(2)
    return w.program(b"}(" + w.value("step") + w.value(3) + w.value("optimizer") + b"}(" + w.value("hook")
                     + w.value(c) + b"uu")


ENCODINGS = {"reduce-p0": _enc_reduce_p0, "reduce-p2": _enc_reduce_p2, "stack-global-p4": _enc_stack_global_p4,
             "inst": _enc_inst, "obj": _enc_obj, "memo-binput": _enc_memo_binput, "memo-long": _enc_memo_long,
             "memo-text": _enc_memo_text, "memoize-p4": _enc_memoize_p4, "memo-overwrite": _enc_memo_overwrite,
             "persistent-id": _enc_persistent_id, "newobj-setstate": _enc_setstate,
             "newobj-ex-setstate": _enc_setstate_ex, "nested": _enc_nested}


def payload_calls(sentinel: str) -> dict[str, Call]:
    """Calls that each create ``sentinel`` when a plain unpickle runs them."""
    touch, code = f"touch {sentinel}", f"open({sentinel!r}, 'w').close()"
    os_system = Call(Global("os", "system"), (touch,))

    def attr(obj, name):
        return Call(Global("builtins", "getattr"), (obj, name))

    return {
        "os.system": os_system,
        "posix.system": Call(Global("posix", "system"), (touch,)),
        "os.popen": Call(Global("os", "popen"), (touch,)),
        "subprocess.call": Call(Global("subprocess", "call"), (["touch", sentinel],)),
        "subprocess.run": Call(Global("subprocess", "run"), (["touch", sentinel],)),
        "subprocess.check_output": Call(Global("subprocess", "check_output"), (["touch", sentinel],)),
        "subprocess.Popen": Call(Global("subprocess", "Popen"), (["touch", sentinel],)),
        "subprocess.getoutput": Call(Global("subprocess", "getoutput"), (touch,)),
        "builtins.eval": Call(Global("builtins", "eval"), (code,)),
        "builtins.exec": Call(Global("builtins", "exec"), (code,)),
        "builtins.open": Call(Global("builtins", "open"), (sentinel, "w")),
        "io.FileIO": Call(Global("io", "FileIO"), (sentinel, "w")),
        "builtins.getattr": Call(attr(Call(Global("builtins", "__import__"), ("os",)), "system"), (touch,)),
        "importlib.import_module": Call(attr(Call(Global("importlib", "import_module"), ("os",)), "system"), (touch,)),
        "pathlib.Path.touch": Call(attr(Call(Global("pathlib", "Path"), (sentinel,)), "touch")),
        "functools.partial": Call(Call(Global("functools", "partial"), (Global("os", "system"), touch))),
        "pickle.loads": Call(Global("pickle", "loads"), (_enc_reduce_p2(os_system),)),
        "torch.storage._load_from_bytes": Call(Global("torch.storage", "_load_from_bytes"),
                                               (_enc_reduce_p2(os_system),)),
    }


class _Runs:
    """Pickles as the call ``func(*args)``: how ``pickle.dump`` / ``torch.save`` smuggle code into a container."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _fickled(clean: bytes, corpus: Corpus) -> dict[str, bytes]:
    """``clean`` with a payload injected by each of fickling's injection methods."""
    from fickling.fickle import Pickled

    out = {}
    for method in ("insert_python_exec", "insert_python_eval", "append_python", "call_on_unpickled",
                   "call_on_unpickled_compiled"):
        code = f"open({corpus.sentinel()!r}, 'w').close()"
        p = Pickled.load(clean)
        if method == "insert_python_exec":
            p.insert_python_exec(code)
        elif method == "insert_python_eval":
            p.insert_python(f"exec({code!r})", module="builtins", attr="eval", use_output_as_unpickle_result=False)
        elif method == "append_python":
            p.append_python(code, module="builtins", attr="exec", pop_result=True)
        else:
            p.insert_function_call_on_unpickled_object(f"def _hook(obj):\n    {code}\n    return obj\n",
                                                       compile_code=method.endswith("compiled"))
        out[method] = p.dumps()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Byte-level surgery on clean files: truncations and bit flips where any flip must break the file

def _truncations(data: bytes, rng: random.Random, n: int, cuts: list[int] | None = None) -> list[bytes]:
    """``n`` prefixes of ``data``, cut at seeded choices among ``cuts`` (default: anywhere)."""
    cuts = range(1, len(data)) if cuts is None else cuts
    return [data[:k] for k in sorted(rng.sample(cuts, n))]


def _flips(data: bytes, positions: list[int], rng: random.Random, n: int) -> list[bytes]:
    out = []
    for pos in sorted(rng.sample(positions, n)):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        out.append(bytes(flipped))
    return out


def _pickle_critical(data: bytes, start: int = 0) -> tuple[list[int], int]:
    """Offsets (from ``start``) whose every bit flip breaks the pickle there: its PROTO and STOP opcodes and the text
    of its GLOBALs (an unknown module or name); and where the pickle ends. Decoded with pickletools: nothing runs."""
    stream = io.BytesIO(data[start:])
    positions = []
    for op, arg, pos in pickletools.genops(stream):
        if op.name in ("PROTO", "STOP"):
            positions.append(start + pos)
        elif op.name == "GLOBAL":
            positions.extend(range(start + pos + 1, start + pos + 2 + len(arg)))
    return positions, start + stream.tell()


def _zip_record_offset(data: bytes, name: str) -> int:
    """Where a stored zip record's bytes start in the file (after its local header)."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _torch_zip_critical(data: bytes) -> list[int]:
    """The critical bytes of a torch zip's data.pkl, and the signature of its end-of-central-directory record."""
    positions, _ = _pickle_critical(data, _zip_record_offset(data, _data_pkl(data)))
    eocd = data.rfind(b"PK\x05\x06")
    return positions + list(range(eocd, eocd + 4))


def _json_critical(data: bytes, start: int = 0, end: int | None = None) -> list[int]:
    """JSON's structural characters: flipping any bit of one breaks the JSON (or the JSON text nested in one of its
    strings, as the built-in prior's config is)."""
    end = len(data) if end is None else end
    return [start + i for i, b in enumerate(data[start:end]) if b in b'{}[]":,']


def _rezip(data: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """A copy of a zip archive with some records' bytes replaced and records added (stored, as torch.save does)."""
    replace, out = replace or {}, io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, replace.get(name, src.read(name)))
        for name, content in (add or {}).items():
            dst.writestr(name, content)
    return out.getvalue()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _data_pkl(data: bytes) -> str:
    return next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("/data.pkl"))


# ---------------------------------------------------------------------------------------------------------------------
# The corpus

@dataclass
class Hostile:
    path: Path
    container: str
    variant: str
    payload: bool  # carries code that creates its sentinel if run
    huge: bool = False  # claims far more memory than the file holds
    calls: list = field(default_factory=list)  # (entry point, callable, the paths its error may name)


class Corpus:
    def __init__(self, root: Path):
        self.root, self.files, self.payloads = root, [], 0
        self.controls = []  # (what, a call that must load a genuine file the corpus is made from)
        self.sentinels = root / "sentinels"
        self.sentinels.mkdir()
        (root / "files").mkdir()
        (root / "configs").mkdir()

    def sentinel(self) -> str:
        """A fresh sentinel path for a payload (never created unless the payload ran)."""
        self.payloads += 1
        return str(self.sentinels / f"ran-{self.payloads:03d}")

    def add(self, container, variant, data: bytes, suffix: str, payload=False, huge=False, card=None) -> Hostile:
        folder = "configs" if container == "config" else "files"
        path = self.root / folder / f"{container}-{len(self.files):03d}-{variant}{suffix}"
        path.write_bytes(data)
        if card is not None:
            path.with_suffix(".json").write_bytes(card)
        entry = Hostile(path, container, variant, payload, huge)
        p = str(path)
        if container == "config":
            entry.calls.append(("read_config", lambda: read_config(p), (p,)))
        else:
            entry.calls.append(("load_prior", lambda: load_prior(p), (p,)))
            entry.calls += [(f"load_prior(format={f!r})", lambda f=f: load_prior(p, format=f), (p,)) for f in FORMATS]
            # A classifier's error names its weights, or its card when the card is at fault.
            entry.calls.append(("load_classifier", lambda: load_classifier(p), (p, str(path.with_suffix(".json")))))
            if container == "raw-pickle":  # the CIFAR-10 batches are raw pickles too
                batches = self.root / "cifar" / path.stem / "cifar-10-batches-py"
                batches.mkdir(parents=True)
                shutil.copyfile(path, batches / "test_batch")
                entry.calls.append(("load_cifar10", lambda: load_cifar10(str(batches.parent)),
                                    (str(batches / "test_batch"),)))
        self.files.append(entry)
        return entry


def _raw_pickles(corpus: Corpus) -> None:
    sample = payload_calls("S")
    for name in sample:
        for enc_name, encode in ENCODINGS.items():
            if encode(sample[name]) is None:
                continue
            data = encode(payload_calls(corpus.sentinel())[name])
            corpus.add("raw-pickle", f"{name}-{enc_name}", data, ".pkl" if len(corpus.files) % 2 else ".pt",
                       payload=True)
    clean = {"step": 3, "sigmas": [1.0, 0.5, 0.25], "config": {"ngf": 8}}
    for protocol in (2, 4):
        for method, data in _fickled(pickle.dumps(clean, protocol=protocol), corpus).items():
            corpus.add("raw-pickle", f"fickling-{method}-p{protocol}", data, ".pkl", payload=True)
    # Memory claims: a memo index of 2^30 (a C unpickler sizes its memo array by it) and bytes objects of 2^40.
    corpus.add("raw-pickle", "memo-index-2e30", b"\x80\x02N" + b"r" + struct.pack("<I", 2**30) + b".", ".pkl",
               huge=True)
    corpus.add("raw-pickle", "binbytes8-2e40", b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"xyz.", ".pkl", huge=True)
    corpus.add("raw-pickle", "frame-2e40", b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.", ".pkl", huge=True)


def _tensor_pkl(numel: int, size: int, key="0", storage_global=Global("torch", "FloatStorage"), legacy=False) -> bytes:
    """The pickle of ``{"w": tensor}`` as torch.save writes it (a zip's data.pkl, or a legacy file's object), by hand
    so that the storage's claims can lie."""
    w = _Writer(2)
    pid = (b"(" + w.value("storage") + w.global_(storage_global) + w.value(key) + w.value("cpu") + w.value(numel)
           + (b"N" if legacy else b"") + b"tQ")  # legacy storage ids also carry view metadata
    tensor = (w.global_(Global("torch._utils", "_rebuild_tensor_v2")) + b"(" + pid + w.value(0) + b"(" + w.value(size)
              + b"t(" + w.value(1) + b"t\x89" + w.global_(Global("collections", "OrderedDict")) + b")RtR")
    return w.program(b"}(" + w.value("w") + tensor + b"u")


def _torch_zips(corpus: Corpus) -> None:
    clean = _torch_bytes({"w": torch.arange(6.0)})
    data_pkl = _data_pkl(clean)
    root = data_pkl.split("/")[0]
    sample = payload_calls("S")
    for name in sample:  # data.pkl replaced by a payload
        for enc_name in ("reduce-p2", "stack-global-p4"):
            data = ENCODINGS[enc_name](payload_calls(corpus.sentinel())[name])
            corpus.add("torch-zip", f"data.pkl-{name}-{enc_name}", _rezip(clean, {data_pkl: data}), ".pt",
                       payload=True)
    for method, data in _fickled(zipfile.ZipFile(io.BytesIO(clean)).read(data_pkl), corpus).items():
        corpus.add("torch-zip", f"fickling-{method}", _rezip(clean, {data_pkl: data}), ".pth", payload=True)
    wrapper_src = corpus.root / "fickling-src.pt"
    wrapper_src.write_bytes(clean)
    from fickling.pytorch import PyTorchModelWrapper

    injected = corpus.root / "fickling-out.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        PyTorchModelWrapper(wrapper_src).inject_payload(f"open({corpus.sentinel()!r}, 'w').close()", injected,
                                                        injection="insertion")
    corpus.add("torch-zip", "fickling-PyTorchModelWrapper", injected.read_bytes(), ".pt", payload=True)
    # Pickles hidden beside the data.pkl of a classifier's weights (which load without them), where torch.load never
    # unpickles them but whatever unpacks the archive might; and a storage record replaced by a pickle.
    torch.manual_seed(0)
    weights = _torch_bytes(MnistCNN().state_dict())
    control = corpus.root / "mnist-classifier.pt"
    control.write_bytes(weights)
    corpus.controls.append(("a classifier's weights as a torch zip", lambda: load_classifier(str(control))))
    weights_root = _data_pkl(weights).split("/")[0]
    for record in ("extra.pkl", "data/evil.pkl", ".data/hook.pickle"):
        hidden = _enc_reduce_p2(payload_calls(corpus.sentinel())["os.system"])
        corpus.add("torch-zip", f"hidden-{record.replace('/', '_')}",
                   _rezip(weights, add={f"{weights_root}/{record}": hidden}), ".pt", payload=True)
    hidden = _enc_reduce_p2(payload_calls(corpus.sentinel())["builtins.exec"])
    corpus.add("torch-zip", "storage-holds-a-pickle", _rezip(clean, {f"{root}/data/0": hidden}), ".pt", payload=True)
    corpus.add("torch-zip", "storage-type-os.system",
               _rezip(clean, {data_pkl: _tensor_pkl(6, 6, storage_global=Global("os", "system"))}), ".pt")
    corpus.add("torch-zip", "storage-record-path-traversal",
               _rezip(clean, {data_pkl: _tensor_pkl(6, 6, key="../../../../etc/passwd")}), ".pt")
    for numel, size in ((2**40, 2**40), (6, 2**40), (2**62, 2**62)):
        corpus.add("torch-zip", f"storage-claims-{numel:.0e}-size-{size:.0e}",
                   _rezip(clean, {data_pkl: _tensor_pkl(numel, size)}), ".pt", huge=True)
    torchscript = _rezip(weights, add={f"{weights_root}/constants.pkl": _enc_reduce_p2(payload_calls(
        corpus.sentinel())["os.system"]), f"{weights_root}/code/__torch__.py": b"import os\nos.system('true')\n"})
    corpus.add("torch-zip", "torchscript-archive-with-payload", torchscript, ".pt", payload=True)
    rng = random.Random("torch-zip")
    for i, data in enumerate(_truncations(clean, rng, 4)):
        corpus.add("torch-zip", f"truncated-{i}", data, ".pt")
    for i, data in enumerate(_flips(clean, _torch_zip_critical(clean), rng, 4)):
        corpus.add("torch-zip", f"bit-flip-{i}", data, ".pt")


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


def _legacy_file(numel=6, size_field=6, shape=6, replace: dict[int, bytes] | None = None) -> bytes:
    """A legacy torch.save file of six floats, written by hand so that its claims can lie: five pickles (magic number,
    protocol version, system info, the object, the storage keys), then the storage's element count and bytes."""
    w = _Writer(2)
    pickles = [w.program(b"\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")), w.program(w.value(1001)),
               w.program(b"}(" + w.value("protocol_version") + w.value(1001) + w.value("little_endian") + b"\x88u"),
               _tensor_pkl(numel, shape, key="k", legacy=True), w.program(b"](" + w.value("k") + b"e")]
    for i, data in (replace or {}).items():
        pickles[i] = data
    return b"".join(pickles) + struct.pack("<q", size_field) + bytes(24)


def _legacy(corpus: Corpus) -> None:
    clean = _legacy_file()
    for i, slot in enumerate(("magic-number", "protocol-version", "sys-info", "object", "storage-keys")):
        for name in ("os.system", "builtins.eval"):
            data = _enc_reduce_p2(payload_calls(corpus.sentinel())[name])
            corpus.add("legacy-torch", f"{slot}-{name}", _legacy_file(replace={i: data}), ".pt", payload=True)
    for numel, size_field, shape in ((2**40, 2**40, 2**40), (6, 2**40, 6), (2**40, 6, 6)):
        corpus.add("legacy-torch", f"storage-claims-{numel:.0e}-{size_field:.0e}",
                   _legacy_file(numel, size_field, shape), ".pt", huge=True)
    rng = random.Random("legacy-torch")
    positions, start = [], 0
    for _ in range(5):
        found, start = _pickle_critical(clean, start)
        positions += found
    for i, data in enumerate(_truncations(clean, rng, 3)):
        corpus.add("legacy-torch", f"truncated-{i}", data, ".pt")
    for i, data in enumerate(_flips(clean, positions, rng, 3)):
        corpus.add("legacy-torch", f"bit-flip-{i}", data, ".pt")


def _containers() -> dict[str, object]:
    """The authors' containers around two tensors each: a reader decides about a file before any network is built."""
    t = torch.ones(2, 2)
    return {
        "score_sde": {"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]},
                      "model": {"module.sigmas": t[0], "module.all_modules.0.weight": t},
                      "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": [t]}, "step": 3},
        "ncsnv2": [{"module.sigmas": t[0], "module.begin_conv.weight": t.reshape(2, 1, 2, 1)},
                   {"state": {}, "param_groups": []}, 1, 3, {"begin_conv.weight": t.reshape(2, 1, 2, 1)}],
        "guided-diffusion": {"input_blocks.0.0.weight": t, "time_embed.0.weight": t, "out.2.weight": t},
        "edm-state-dict": {"model.map_layer0.weight": t, "model.enc.8x8_conv.weight": t},
    }


def _reducer_payloads(sentinel: str) -> dict[str, _Runs]:
    return {"os.system": _Runs(os.system, f"touch {sentinel}"),
            "subprocess.call": _Runs(subprocess.call, ["touch", sentinel]),
            "builtins.exec": _Runs(builtins.exec, f"open({sentinel!r}, 'w').close()"),
            "builtins.eval": _Runs(builtins.eval, f"open({sentinel!r}, 'w').close()")}


def _with_payload(container, slot: int, runs: _Runs):
    """``container`` with one entry (the ``slot``-th, cycling over its entries) replaced by ``runs``."""
    if isinstance(container, list):
        return [runs if i == slot % len(container) else v for i, v in enumerate(container)]
    key = list(container)[slot % len(container)]
    return {k: (runs if k == key else v) for k, v in container.items()}


def _authors_containers(corpus: Corpus) -> None:
    for name, container in _containers().items():
        suffix = ".pth" if name in ("score_sde", "ncsnv2") else ".pt"
        clean = _torch_bytes(container)
        for slot, payload in enumerate(_reducer_payloads("S")):
            runs = _reducer_payloads(corpus.sentinel())[payload]
            corpus.add(name, f"entry-{slot}-{payload}", _torch_bytes(_with_payload(container, slot, runs)), suffix,
                       payload=True)
        for method, data in _fickled(zipfile.ZipFile(io.BytesIO(clean)).read(_data_pkl(clean)), corpus).items():
            corpus.add(name, f"fickling-{method}", _rezip(clean, {_data_pkl(clean): data}), suffix, payload=True)
        rng = random.Random(name)
        for i, data in enumerate(_truncations(clean, rng, 2)):
            corpus.add(name, f"truncated-{i}", data, suffix)
        for i, data in enumerate(_flips(clean, _torch_zip_critical(clean), rng, 2)):
            corpus.add(name, f"bit-flip-{i}", data, suffix)
    clean = _torch_bytes(_containers()["guided-diffusion"])
    corpus.add("guided-diffusion", "storage-claims-1e12", _rezip(clean, {_data_pkl(clean): _tensor_pkl(2**40, 2**40)}),
               ".pt", huge=True)


# EDM's persistence layout, written by pickle itself: records are reduced to a placeholder function of this module,
# whose GLOBAL is then renamed to torch_utils.persistence._reconstruct_persistent_obj. Protocol 3 writes globals as
# text lines, so the rename is a byte replacement, and bytes as BINBYTES, as EDM's protocol 4 does.

def _reconstruct_placeholder(meta):
    raise AssertionError("never called: renamed before anything reads the file")


PLACEHOLDER = f"c{_reconstruct_placeholder.__module__}\n{_reconstruct_placeholder.__qualname__}\n".encode()
RECONSTRUCT = b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"


@dataclass
class _Record:
    meta: dict


class _ModuleDictRecord:
    def __init__(self, state):
        self.state = state


class _EDMPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, _Record):
            return _reconstruct_placeholder, (obj.meta,)
        if isinstance(obj, _ModuleDictRecord):
            return torch.nn.ModuleDict, (), obj.state
        return NotImplemented


def _edm_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    _EDMPickler(buffer, protocol=3).dump(obj)
    data = buffer.getvalue()
    assert b"\x80\x03" == data[:2] and PLACEHOLDER in data
    return data.replace(PLACEHOLDER, RECONSTRUCT)


def _edm_record(module: torch.nn.Module, source: str, init_kwargs=None, **meta_changes) -> _Record:
    """A module as EDM's persistence pickles it: its ``__dict__`` (children as records) and the module's source."""
    children = collections.OrderedDict(
        (n, _ModuleDictRecord({"_parameters": {}, "_buffers": {}, "_modules": collections.OrderedDict(
            (k, _edm_record(v, source)) for k, v in c.items())}) if type(c) is torch.nn.ModuleDict
            else None if c is None else _edm_record(c, source)) for n, c in module._modules.items())
    state = {"training": False, "_parameters": collections.OrderedDict(module._parameters),
             "_buffers": collections.OrderedDict(module._buffers), "_modules": children, "_init_args": (),
             "_init_kwargs": init_kwargs or {}}
    meta = dict(type="class", version=6, module_src=source, class_name=type(module).__name__, state=state)
    meta.update(meta_changes)
    return _Record(meta)


TINY_EDM = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1],
                num_blocks=1, attn_resolutions=[], embedding_type="positional", channel_mult_noise=1,
                resample_filter=[1, 1])


def tiny_edm() -> edm.EDMPrecond:
    torch.manual_seed(0)
    return edm.EDMPrecond(**TINY_EDM).eval()


def edm_snapshot(net, source: str, ema=None) -> bytes:
    """EDM's training snapshot ``{ema, loss_fn, augment_pipe, dataset_kwargs}`` around ``net``."""
    loss = _Record(dict(type="class", version=6, module_src=source, class_name="EDMLoss",
                        state={"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}))
    snapshot = {"ema": ema or _edm_record(net, source, TINY_EDM), "loss_fn": loss, "augment_pipe": None,
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "resolution": 8}}
    return _edm_bytes(snapshot)


def _edm_pickles(corpus: Corpus) -> None:
    net = tiny_edm()
    clean = edm_snapshot(net, "# training/networks.py\n")
    control = corpus.root / "edm-snapshot.pkl"
    control.write_bytes(clean)
    corpus.controls.append(("an EDM network snapshot", lambda: load_prior(str(control))))

    def source():
        return f"open({corpus.sentinel()!r}, 'w').close()\n"

    triggers = {  # reasons to refuse a snapshot whose embedded source is a payload
        "version-5": lambda s: edm_snapshot(net, s, ema=_edm_record(net, s, TINY_EDM, version=5)),
        "unknown-class": lambda s: edm_snapshot(net, s, ema=_edm_record(net, s, TINY_EDM, class_name="Backdoor")),
        "type-module": lambda s: edm_snapshot(net, s, ema=_edm_record(net, s, TINY_EDM, type="module")),
        "state-not-a-dict": lambda s: edm_snapshot(net, s, ema=_edm_record(net, s, TINY_EDM, state=[1, 2])),
        "ema-is-the-loss": lambda s: edm_snapshot(net, s, ema=_Record(dict(
            type="class", version=6, module_src=s, class_name="EDMLoss", state={}))),
        "positional-init-args": lambda s: edm_snapshot(net, s, ema=_edm_record(net, s, TINY_EDM, state={
            **_edm_record(net, s, TINY_EDM).meta["state"], "_init_args": (8, 1)})),
        "no-ema": lambda s: _edm_bytes({"loss_fn": _edm_record(net, s), "augment_pipe": None}),
        "inner-model-mismatch": lambda s: edm_snapshot(net, s, ema=_edm_record(net, s, dict(
            img_resolution=8, img_channels=1, model_type="DhariwalUNet", model_channels=8, channel_mult=[1],
            num_blocks=1, attn_resolutions=[]))),
    }
    for name, build in triggers.items():
        corpus.add("edm-pickle", f"source-payload-{name}", build(source()), ".pkl", payload=True)

    def extra_calls(s):  # other globals EDM's own code resolves (its source loader, its factory), and plain ones
        return {"persistence._src_to_module": Call(Global("torch_utils.persistence", "_src_to_module"),
                                                   (f"open({s!r}, 'w').close()",)),
                "dnnlib.get_obj_by_name": Call(Call(Global("dnnlib.util", "get_obj_by_name"), ("os.system",)),
                                               (f"touch {s}",)),
                "os.system": Call(Global("os", "system"), (f"touch {s}",)),
                "builtins.exec": Call(Global("builtins", "exec"), (f"open({s!r}, 'w').close()",))}

    ops = list(pickletools.genops(clean))
    # The snapshot's augment_pipe entry (None) becomes the call.
    none = next(pos for (op, _, pos), (_, key, _) in zip(ops[2:], ops) if op.name == "NONE" and key == "augment_pipe")
    for name in extra_calls("S"):
        call = extra_calls(corpus.sentinel())[name]
        corpus.add("edm-pickle", f"augment_pipe-{name}", clean[:none] + _Writer(3).value(call) + clean[none + 1:],
                   ".pkl", payload=True)
    # Storages are torch.save bytes that the reader loads itself: hide a payload in the first one.
    after = next(i for i, (op, arg, _) in enumerate(ops) if arg == "torch.storage _load_from_bytes")
    _, arg, pos = next(o for o in ops[after:] if o[0].name == "BINBYTES")
    torch_zip = _torch_bytes({"w": torch.arange(6.0)})
    for name, inner in (("raw-pickle", _enc_reduce_p2(payload_calls(corpus.sentinel())["os.system"])),
                        ("torch-zip", _rezip(torch_zip, {_data_pkl(torch_zip): _enc_reduce_p2(
                            payload_calls(corpus.sentinel())["os.system"])}))):
        data = clean[:pos] + _Writer(3).value(inner) + clean[pos + 5 + len(arg):]
        corpus.add("edm-pickle", f"storage-bytes-{name}-payload", data, ".pkl", payload=True)
    w = _Writer(3)
    object_scalar = w.program(w.value(Call(Global("numpy.core.multiarray", "scalar"), (
        Call(Global("numpy", "dtype"), ("O", 0, 1)), b"\x00" * 8))))
    corpus.add("edm-pickle", "numpy-object-scalar", object_scalar, ".pkl")
    for method, data in _fickled(clean, corpus).items():
        corpus.add("edm-pickle", f"fickling-{method}", data, ".pkl", payload=True)
    # Memory claims: constructor arguments for a network of terabytes around the tiny one's tensors.
    for name, changes in (("model_channels", dict(model_channels=2**20)),
                          ("channel_mult", dict(channel_mult=[2**16] * 3)),
                          ("img_resolution", dict(img_resolution=2**20))):
        kwargs = dict(TINY_EDM, **changes)
        corpus.add("edm-pickle", f"init-kwargs-huge-{name}", edm_snapshot(net, "", ema=_edm_record(
            net, "", kwargs)), ".pkl", huge=True)
    rng = random.Random("edm-pickle")
    # Cut before an opcode: the tensors' bytes hold torch.save ids that vary in length between runs, the opcodes not.
    opcodes = [pos for _, _, pos in ops[1:]]
    for i, data in enumerate(_truncations(clean, rng, 4, opcodes)):
        corpus.add("edm-pickle", f"truncated-{i}", data, ".pkl")
    for i, data in enumerate(_flips(clean, _pickle_critical(clean)[0], rng, 4)):
        corpus.add("edm-pickle", f"bit-flip-{i}", data, ".pkl")


# ---------------------------------------------------------------------------------------------------------------------
# safetensors: fuzzed headers, hostile metadata, the built-in prior and the classifiers

def _safetensors(header: dict, data: bytes = b"", sort_keys: bool = False) -> bytes:
    text = json.dumps(header, sort_keys=sort_keys).encode()
    return struct.pack("<Q", len(text)) + text + data


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]


@st.composite
def fuzzed_safetensors(draw) -> bytes:
    """A safetensors file that is no checkpoint of ours: mostly a broken or lying header (bad JSON, offsets out of
    range, sizes of terabytes, unknown dtypes, metadata that is not a string map, a length that does not match), at
    times a readable file of random tensors."""
    names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
    sizes = st.integers(0, 8) | st.sampled_from([2**31, 2**40, 2**63 - 1, -1])
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(DTYPES) | st.sampled_from(["F128", "c64", "str", "object", "", "O"]),
        "shape": st.lists(sizes, max_size=4),
        "data_offsets": st.lists(st.integers(0, 64) | st.sampled_from([2**40, 2**64 - 1, -8]), max_size=3),
    })
    header = draw(st.dictionaries(names, entry, max_size=3))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(
            st.sampled_from(["format", "config", "sigma_data", "x"]),
            st.sampled_from([BUILTIN_FORMAT, "{\"base_channels\": 4}", "0.5", "nan", "}{"]) | st.integers() | st.none(),
            max_size=3))
    data = draw(st.binary(max_size=64))
    text = json.dumps(header).encode()
    damage = draw(st.sampled_from(["none", "truncate", "garbage", "not-utf8", "length-huge", "length-off", "empty"]))
    if damage == "truncate":
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    elif damage == "garbage":
        text += b"\x00{]"
    elif damage == "not-utf8":
        text = b'{"\xff\xfe": 1}'
    length = {"length-huge": 2**40 + len(text), "length-off": len(text) + draw(st.sampled_from([-3, -1, 1, 7]))}.get(
        damage, len(text))
    if damage == "empty":
        return b""
    return struct.pack("<Q", max(length, 0)) + text + data


def _fuzzed(n: int, home: Path) -> list[bytes]:
    """``n`` examples of :func:`fuzzed_safetensors`, the same each run. Hypothesis writes its caches (constants,
    unicode tables) under its home directory, by default ``./.hypothesis``: here under ``home`` instead."""
    found = []

    @settings(derandomize=True, max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzzed_safetensors())
    def collect(data):
        if data not in found:
            found.append(data)

    set_hypothesis_home_dir(home)
    try:
        collect()
    finally:
        set_hypothesis_home_dir(None)  # back to the default, resolved again on next use
    return found


def _safetensors_files(corpus: Corpus) -> None:
    for i, data in enumerate(_fuzzed(40, corpus.root / "hypothesis")):
        corpus.add("safetensors", f"fuzzed-{i:02d}", data, ".safetensors")
    # Files claiming terabytes, in the header's length and in a tensor's shape and offsets.
    corpus.add("safetensors", "header-length-1e12", struct.pack("<Q", 2**40) + b"{}", ".safetensors", huge=True)
    corpus.add("safetensors", "tensor-shape-1e12", _safetensors(
        {"w": {"dtype": "F32", "shape": [2**20, 2**18], "data_offsets": [0, 2**40]}}, bytes(8)), ".safetensors",
        huge=True)
    corpus.add("safetensors", "tensor-offsets-2e64", _safetensors(
        {"w": {"dtype": "U8", "shape": [2**62], "data_offsets": [0, 2**64 - 1]}}, bytes(8)), ".safetensors", huge=True)
    # The built-in prior: its metadata (format, config, sigma_data) decides what is built. safetensors writes the
    # metadata in hash order; the header is rewritten sorted, so that every variant below is the same bytes each run.
    path = corpus.root / "builtin.safetensors"
    save_builtin_prior(tiny_prior(torch.float32), str(path))
    written = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", written[:8])[0]
    header, tensors = json.loads(written[8:header_end]), written[header_end:]
    clean = _safetensors(header, tensors, sort_keys=True)
    path.write_bytes(clean)
    corpus.controls.append(("the built-in prior", lambda: load_prior(str(path))))

    def with_metadata(**changes) -> bytes:
        metadata = {k: v for k, v in {**header["__metadata__"], **changes}.items() if v is not None}
        return _safetensors({**header, "__metadata__": metadata}, tensors, sort_keys=True)

    config = json.loads(header["__metadata__"]["config"])
    metadata_cases = {
        "config-not-json": {"config": "{in_channels: 1"},
        "config-unknown-argument": {"config": json.dumps({**config, "backdoor": True})},
        "config-not-a-mapping": {"config": "[1, 2]"},
        "config-python-payload": {"config": f"__import__('os').system('touch {corpus.sentinel()}')"},
        "config-negative": {"config": json.dumps({**config, "base_channels": -4})},
        "config-other-network": {"config": json.dumps({**config, "base_channels": 16})},
        "sigma-data-missing": {"sigma_data": None},
        "sigma-data-text": {"sigma_data": "half"},
        "sigma-data-nan": {"sigma_data": "nan"},
        "config-missing": {"config": None},
    }
    for name, changes in metadata_cases.items():
        corpus.add("safetensors", f"builtin-{name}", with_metadata(**changes), ".safetensors",
                   payload="payload" in name)
    for name, changes in (("base_channels", {"base_channels": 2**20}), ("emb_dim", {"emb_dim": 2**24}),
                          ("channel_mults", {"channel_mults": [2**12] * 4})):
        huge_config = json.dumps({**config, **changes})
        corpus.add("safetensors", f"builtin-config-huge-{name}", with_metadata(config=huge_config), ".safetensors",
                   huge=True)
    rng = random.Random("safetensors")
    header_end = 8 + struct.unpack("<Q", clean[:8])[0]
    for i, data in enumerate(_truncations(clean, rng, 3)):
        corpus.add("safetensors", f"builtin-truncated-{i}", data, ".safetensors")
    for i, data in enumerate(_flips(clean, list(range(8)) + _json_critical(clean, 8, header_end), rng, 3)):
        corpus.add("safetensors", f"builtin-bit-flip-{i}", data, ".safetensors")
    # Classifiers: weights of another network, and cards (the JSON beside the weights) that lie or are not JSON.
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out = corpus.root / "mnist.safetensors"
    save_file({k: v.contiguous() for k, v in MnistCNN().state_dict().items()}, str(out))
    mnist = out.read_bytes()
    control = corpus.root / "mnist-classifier.safetensors"
    control.write_bytes(mnist)
    corpus.controls.append(("a classifier's safetensors", lambda: load_classifier(str(control))))
    lying = {k: v[..., :1].contiguous() for k, v in MnistCNN().state_dict().items()}
    save_file(lying, str(out))
    corpus.add("safetensors", "classifier-other-shapes", out.read_bytes(), ".safetensors")
    arch_payload = f"__import__('os').system('touch {corpus.sentinel()}')"
    for name, card in (("card-arch-payload", json.dumps({"model": arch_payload})),
                       ("card-not-json", "{model: MnistCNN"), ("card-not-a-mapping", '["MnistCNN"]'),
                       ("card-model-not-a-name", json.dumps({"model": ["MnistCNN"]})),
                       ("card-fashion-arch", json.dumps({"model": "FashionCNN"})), ("card-not-utf8", "\udcff")):
        corpus.add("safetensors", f"classifier-{name}", mnist, ".safetensors", payload="payload" in name,
                   card=card.encode("utf-8", "surrogateescape"))
    rng = random.Random("classifier")
    header_end = 8 + struct.unpack("<Q", mnist[:8])[0]
    for i, data in enumerate(_truncations(mnist, rng, 2)):
        corpus.add("safetensors", f"classifier-truncated-{i}", data, ".safetensors")
    for i, data in enumerate(_flips(mnist, list(range(8)) + _json_critical(mnist, 8, header_end), rng, 2)):
        corpus.add("safetensors", f"classifier-bit-flip-{i}", data, ".safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Configs

REFERENCES_ONLY = ("name-os.system", "module-os", "ncsnv2-namespace")  # tags that name Python objects but call none


def _configs(corpus: Corpus) -> None:
    def yaml_payloads(s):
        code = f"open('{s}', 'w').close()"
        return {
            "apply-os.system": f"!!python/object/apply:os.system ['touch {s}']\n",
            "apply-subprocess.call": f"model: !!python/object/apply:subprocess.call [[touch, '{s}']]\n",
            "apply-builtins.eval": f"data:\n  x: !!python/object/apply:builtins.eval [\"{code}\"]\n",
            "apply-builtins.exec": f"!!python/object/apply:builtins.exec [\"{code}\"]\n",
            "apply-open": f"- !!python/object/apply:builtins.open ['{s}', 'w']\n",
            "new-tuple-map-eval": (f"!!python/object/new:tuple [!!python/object/new:map "
                                   f"[!!python/name:eval , [\"{code}\"]]]\n"),
            "apply-check_output": f"!!python/object/apply:subprocess.check_output [[touch, '{s}']]\n",
            "name-os.system": f"cmd: !!python/name:os.system\narg: touch {s}\n",
            "module-os": f"os: !!python/module:os\narg: touch {s}\n",
            "apply-in-anchor": f"a: &p !!python/object/apply:os.system ['touch {s}']\nb: *p\n",
            "apply-kwds": f"!!python/object/apply:subprocess.run\nkwds: {{args: [touch, '{s}']}}\n",
            "ncsnv2-namespace": "!!python/object:argparse.Namespace\ndata: {channels: 3}\nmodel: {ngf: 128}\n",
        }

    for name in yaml_payloads("S"):
        corpus.add("config", f"yaml-{name}", yaml_payloads(corpus.sentinel())[name].encode(),
                   ".yml" if len(corpus.files) % 2 else ".yaml", payload=name not in REFERENCES_ONLY)
    malformed = {
        "yaml-tabs": (b"model:\n\tngf: 8\n", ".yaml"), "yaml-unclosed": (b"model: {ngf: [8, 16\n", ".yaml"),
        "yaml-unknown-tag": (b"model: !backdoor {ngf: 8}\n", ".yaml"), "yaml-list": (b"- 1\n- 2\n", ".yaml"),
        "yaml-scalar": (b"vp/cifar10_ddpmpp_continuous\n", ".yml"), "yaml-empty": (b"", ".yaml"),
        "yaml-not-utf8": (b"model: {ngf: \xff\xfe}\n", ".yaml"), "yaml-nul": (b"model: \x00\n", ".yaml"),
        "yaml-deep": (b"[" * 100000 + b"]" * 100000, ".yaml"), "json-deep": (b"[" * 100000 + b"]" * 100000, ".json"),
        "json-trailing-comma": (b'{"model": {"ngf": 8,}}', ".json"), "json-nan-key": (b"{NaN: 1}", ".json"),
        "json-list": (b"[1, 2]", ".json"), "json-null": (b"null", ".json"), "json-empty": (b"", ".json"),
        "json-not-utf8": (b'{"model": "\xff"}', ".json"), "json-binary": (bytes(range(256)), ".json"),
        "json-pickle-inside": (_enc_reduce_p2(payload_calls("S")["os.system"]), ".json"),
        "toml-suffix": (b"[model]\nngf = 8\n", ".toml"),
    }
    for name, (data, suffix) in malformed.items():
        corpus.add("config", name, data, suffix)
    clean = json.dumps({"data": {"rescaled": True, "channels": 3}, "model": {"ngf": 8, "ema": True}}).encode()
    for suffix in (".json", ".yaml"):  # JSON is YAML too
        control = corpus.root / f"config{suffix}"
        control.write_bytes(clean)
        corpus.controls.append((f"a {suffix} config", lambda control=control: read_config(str(control))))
    rng = random.Random("config")
    for i, data in enumerate(_truncations(clean, rng, 3)):
        corpus.add("config", f"json-truncated-{i}", data, ".json")
    for i, data in enumerate(_flips(clean, _json_critical(clean), rng, 3)):
        corpus.add("config", f"json-bit-flip-{i}", data, ".json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    corpus = Corpus(tmp_path_factory.mktemp("hostile"))
    for build in (_raw_pickles, _torch_zips, _legacy, _authors_containers, _edm_pickles, _safetensors_files, _configs):
        build(corpus)
    return corpus


# ---------------------------------------------------------------------------------------------------------------------
# The checks

def _rss_reset() -> int:
    """Reset this process's peak resident memory (Linux: VmHWM) to its current value and return it, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_peak()


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _problem(message: str, paths: tuple[str, ...]) -> str | None:
    """What is wrong with an error message: it must name the file and say why."""
    path = next((p for p in paths if p in message), None)
    if path is None:
        return "does not name the file"
    if len(re.findall(r"[A-Za-z]{3,}", message.replace(path, ""))) < 3:
        return "gives no reason"
    return None


def _scan(path: Path) -> tuple[bool, bool]:
    """(fickling, picklescan) call the file unsafe. fickling: a severity above LIKELY_SAFE (its own load threshold),
    or a pickle it cannot parse, in the file or in any pickle record of a zip; picklescan: a dangerous global, or a
    scan error."""
    import fickling
    from picklescan.scanner import scan_file_path

    with contextlib.redirect_stdout(io.StringIO()):  # fickling prints its parse warnings
        if zipfile.is_zipfile(path):
            verdicts = list(fickling.scan_zip_archive(str(path), graceful=True).values())
        else:
            verdicts = [fickling.scan_file(str(path), graceful=True)]
    try:
        scan = scan_file_path(str(path))
        picklescan_unsafe = scan.infected_files > 0 or scan.scan_err
    except Exception:  # noqa: BLE001  picklescan gives up on some broken zips: a scan error
        picklescan_unsafe = True
    return any(not v for v in verdicts), picklescan_unsafe


def _refusals(corpus: Corpus) -> tuple[list[str], dict[str, bool], dict[str, float], dict[str, float]]:
    """Every entry point on every file: the failures, whether each file was refused everywhere, and each file's peak
    memory rise (MB) and time (s)."""
    failures, refused, peaks, seconds = [], {}, {}, {}
    for entry in corpus.files:
        start, base, before = time.perf_counter(), _rss_reset(), len(failures)
        for label, call, paths in entry.calls:
            try:
                call()
            except (ValueError, FileNotFoundError) as err:
                problem = _problem(str(err), paths)
                if problem:
                    failures.append(f"{entry.path.name} via {label}: the error {problem}: {err!r}"[:400])
            except Exception as err:  # noqa: BLE001  any other type is a finding
                failures.append(f"{entry.path.name} via {label}: {type(err).__name__}, not ValueError: {err!r}"[:400])
            else:
                failures.append(f"{entry.path.name} via {label}: loaded")
            if any(corpus.sentinels.iterdir()):
                failures.append(f"{entry.path.name} via {label}: a payload ran ({sorted(corpus.sentinels.iterdir())})")
        name = entry.path.name
        seconds[name], peaks[name] = time.perf_counter() - start, (_rss_peak() - base) / 2**20
        if peaks[name] > PEAK_MB:
            failures.append(f"{name}: its loads raised peak resident memory by {peaks[name]:.0f} MB")
        if seconds[name] > (HUGE_SECONDS if entry.huge else FILE_SECONDS):
            failures.append(f"{name}: its loads took {seconds[name]:.1f} s")
        refused[name] = len(failures) == before
    return failures, refused, peaks, seconds


def test_every_hostile_or_malformed_file_is_refused_naming_it(corpus, record_testsuite_property):
    for label, load in corpus.controls:  # the genuine files the corpus is made from load (and warm the imports up)
        assert load() is not None, label
    failures, refused, peaks, seconds = _refusals(corpus)
    scanned = [f for f in corpus.files if f.container not in ("config", "safetensors")]
    verdicts = {f.path.name: _scan(f.path) for f in scanned}
    flagged = [name for name, verdict in verdicts.items() if any(verdict)]
    huge = [f.path.name for f in corpus.files if f.huge]
    figures = {
        "files": len(corpus.files),
        "files per container": dict(collections.Counter(f.container for f in corpus.files)),
        "files with code payloads": sum(f.payload for f in corpus.files),
        "payloads per container": dict(collections.Counter(f.container for f in corpus.files if f.payload)),
        "loads": sum(len(f.calls) for f in corpus.files),
        "sentinels fired": len(list(corpus.sentinels.iterdir())),
        "files claiming terabytes": len(huge),
        "their slowest refusal (s, all entry points)": round(max(seconds[n] for n in huge), 3),
        "their largest peak memory rise (MB)": round(max(peaks[n] for n in huge), 1),
        "largest peak memory rise of any file (MB)": round(max(peaks.values()), 1),
        "pickle-bearing files scanned": len(scanned),
        "fickling unsafe": sum(v[0] for v in verdicts.values()),
        "picklescan unsafe": sum(v[1] for v in verdicts.values()),
        "either scanner unsafe": len(flagged),
        "of those refused by every entry point": sum(refused[name] for name in flagged),
        "payload files fickling misses": sum(f.payload and not verdicts[f.path.name][0] for f in scanned),
        "payload files picklescan misses": sum(f.payload and not verdicts[f.path.name][1] for f in scanned),
        "payload files neither scanner flags": sorted(f.path.name for f in scanned if f.payload
                                                      and not any(verdicts[f.path.name])),
    }
    for name, value in figures.items():
        record_testsuite_property(name, json.dumps(value))
    report = json.dumps(figures, indent=1)
    assert not failures, "\n".join(failures[:30]) + f"\n({len(failures)} failures)\n{report}"
    assert figures["sentinels fired"] == 0, report
    assert figures["of those refused by every entry point"] == figures["either scanner unsafe"], report
    assert figures["files"] >= MIN_FILES, report


def test_a_genuine_edm_network_loads_without_running_its_payload_source(tmp_path):
    """The one hostile file that must load: a genuine EDM network whose embedded module source (which every EDM pickle
    carries, and a plain unpickle executes) would create a sentinel. The reader ignores the source."""
    sentinel = tmp_path / "ran"
    net = tiny_edm()
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(edm_snapshot(net, f"open({str(sentinel)!r}, 'w').close()\n"))
    prior = load_prior(str(path))
    assert not sentinel.exists()
    x, sigma = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.tensor([0.3, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(prior.precond(x, sigma), net(x, sigma), rtol=0, atol=0)
