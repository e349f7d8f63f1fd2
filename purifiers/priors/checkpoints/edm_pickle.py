"""Read NVlabs EDM's network pickles (``edm-*.pkl``) without running any code they carry.

EDM pickles its networks with ``torch_utils.persistence``: each persistent object is stored as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` is a dict
``{type: "class", version: 6, module_src: <the source text of the defining module>, class_name, state}`` and
``state`` is the object's ``__dict__`` (for a ``torch.nn.Module``: ``_parameters``, ``_buffers``, ``_modules``, ...
plus the constructor arguments as ``_init_args`` / ``_init_kwargs``). A normal unpickle imports ``torch_utils`` and
``exec``-utes ``module_src``, i.e. runs whatever the file says.

:class:`RestrictedUnpickler` instead resolves only the few globals such a file needs, to inert stand-ins: the
reconstruct call yields a :class:`PersistedObject` record (class name, state; the source text is never read),
``torch.nn.ModuleDict`` a :class:`PersistedContainer`, tensors go through torch's weights-only loader, numpy
scalars through ``numpy.frombuffer``. Any other global, and any persistent class outside :data:`KNOWN_CLASSES`, is
refused with a ``ValueError`` naming it; no module named in the file is imported.

:func:`network_from_persisted` then builds our re-implementation (:mod:`purifiers.nets.edm`) from the record's
recorded constructor arguments and loads its tensors (strict: every name and shape must match, checked on the meta
device before any memory is allocated, so arguments that describe a far larger network cost nothing).
"""

from __future__ import annotations

import collections
import io
import pickle

import numpy as np
import torch

from purifiers.nets import edm

# The network classes whose records we map onto ours (layers appear nested inside the preconditioners), and the
# training-side objects of a snapshot (loss, augmentation pipeline) that are read as inert records and not used.
NETWORK_CLASSES = frozenset(edm.PRECONDITIONERS) | frozenset(edm.NETWORKS) | frozenset(
    {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"})
TRAINING_CLASSES = frozenset({"EDMLoss", "VPLoss", "VELoss", "AugmentPipe"})
KNOWN_CLASSES = NETWORK_CLASSES | TRAINING_CLASSES
PERSISTENCE_VERSION = 6  # the layout version torch_utils.persistence writes (and checks) in NVlabs/edm


class PersistedObject:
    """An EDM persistent object as recorded in the pickle: its class name and its ``__dict__`` (never executed)."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self) -> str:
        return f"PersistedObject({self.class_name})"


class PersistedContainer:
    """A plain ``torch.nn.ModuleDict`` inside a persistent network (its state is applied by pickle's BUILD)."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _reconstruct_persistent_obj(meta) -> PersistedObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: validates the record, keeps the state,
    and ignores ``module_src`` (the embedded source) entirely."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise ValueError("malformed EDM persistent object: expected a dict with type='class' and a state dict.")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise ValueError(f"EDM persistence layout version {meta.get('version')!r}; only version "
                         f"{PERSISTENCE_VERSION} (NVlabs/edm) is supported.")
    class_name = meta.get("class_name")
    if class_name not in KNOWN_CLASSES:
        raise ValueError(f"the pickle holds an unknown class {class_name!r}; known EDM classes: "
                         f"{sorted(KNOWN_CLASSES)}. Nothing was executed.")
    return PersistedObject(class_name, meta["state"])


def _load_storage(data: bytes):
    """Stand-in for ``torch.storage._load_from_bytes``: the bytes are a ``torch.save`` of one storage, read weights-only
    (the original reads them with a full unpickle)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"refusing a tensor storage that torch.load(weights_only=True) cannot read (a pickle "
                         f"holding code, or corrupt): {type(err).__name__}: {str(err).strip()[:200]}") from err


def _numpy_scalar(dtype: np.dtype, data: bytes = b""):
    """Stand-in for numpy's ``multiarray.scalar(dtype, bytes)``: numeric scalars only, decoded from their bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise ValueError(f"refusing a numpy scalar of dtype {dtype!r}: only numeric scalars are read.")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(spec: str, align: bool = False, copy: bool = True) -> np.dtype:
    if not isinstance(spec, str) or np.dtype(spec).kind not in "biuf":
        raise ValueError(f"refusing numpy dtype {spec!r}: only numeric dtypes are read.")
    return np.dtype(spec)


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` is a dict with attribute access; read as a plain dict."""


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.nn.modules.container", "ModuleDict"): PersistedContainer,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _numpy_dtype,
    # numpy < 2 writes numpy.core, numpy >= 2 numpy._core: the same function.
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` (to inert stand-ins) and refuses everything else.

    It is the pure-Python unpickler: the C one sizes its memo array by the largest index a PUT names, so a 9-byte
    file naming index 2^30 made it fill 16 GB; this one keeps the memo in a dict. An EDM pickle is a few thousand
    opcodes around its tensors' bytes, so the speed is the same (0.3 s for a 213 MB CIFAR-10 network, measured).
    """

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ValueError(f"refusing to load: the pickle references {module}.{name}, which an EDM network pickle "
                             "does not need (loading it could run arbitrary code).") from None

    def persistent_load(self, pid):
        raise ValueError("refusing to load: the pickle uses persistent ids (it is not an EDM network pickle; "
                         "torch.save files are read with weights_only=True).")


def read_edm_pickle(path: str):
    """The unpickled content of an EDM ``.pkl`` file, with persistent objects as :class:`PersistedObject` records."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f).load()
        except ValueError as err:  # a refusal of ours (or a malformed number): say which file
            raise ValueError(f"{path}: {err}") from err
        except Exception as err:  # EOFError, UnpicklingError, ...: truncated or not a pickle
            raise ValueError(f"{path} is not a readable EDM pickle (truncated or another format?): "
                             f"{type(err).__name__}: {err}") from err


def _tensors(record, prefix: str = "") -> dict:
    """``state_dict()``-style flat name -> tensor of a persisted module tree (non-persistent buffers left out)."""
    if isinstance(record, PersistedObject):
        state = record.state
    elif isinstance(record, PersistedContainer):
        state = getattr(record, "state", {})
    else:
        raise ValueError(f"unexpected {type(record).__name__} in the module tree at {prefix or 'the root'!r}.")
    out = {}
    for name, value in state.get("_parameters", {}).items():
        if value is not None:
            out[prefix + name] = value
    skipped = state.get("_non_persistent_buffers_set", set())
    for name, value in state.get("_buffers", {}).items():
        if value is not None and name not in skipped:
            out[prefix + name] = value
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(_tensors(child, f"{prefix}{name}."))
    return out


def network_from_persisted(record) -> edm._Precond:
    """Our preconditioned network for a persisted EDM preconditioner record, weights loaded (float32, eval mode)."""
    if not isinstance(record, PersistedObject):
        raise ValueError(f"expected an EDM network, got {type(record).__name__}.")
    if record.class_name not in edm.PRECONDITIONERS:
        raise ValueError(f"the EDM object is a {record.class_name!r}; a prior needs a preconditioned network "
                         f"({sorted(edm.PRECONDITIONERS)}).")
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise ValueError(f"the {record.class_name} record lacks its constructor keyword arguments (_init_kwargs).")
    cls = edm.PRECONDITIONERS[record.class_name]
    try:
        with torch.device("meta"):  # names and shapes only, whatever size the recorded arguments describe
            skeleton = cls(**dict(kwargs))
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"the {record.class_name} record has constructor arguments this re-implementation cannot "
                         f"build: {type(err).__name__}: {err}") from err
    inner = record.state.get("_modules", {}).get("model")
    if not isinstance(inner, PersistedObject) or inner.class_name != skeleton.model_type:
        raise ValueError(f"the {record.class_name} record wraps {getattr(inner, 'class_name', inner)!r}, not the "
                         f"{skeleton.model_type!r} its arguments name.")
    what, state = f"EDM {record.class_name}/{skeleton.model_type}", _tensors(record)
    check_fits(skeleton, state, what)
    net = cls(**dict(kwargs))
    load_checked_state_dict(net, state, what)
    return net.eval()


def check_fits(net: torch.nn.Module, state: dict, what: str) -> None:
    """A ``ValueError`` listing missing, unexpected and mis-shaped names unless ``state`` fits ``net`` (which may live
    on the meta device)."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"the checkpoint does not fit {what} (another architecture or configuration?): "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(shapes)} of another shape (e.g. {shapes[:3]}).")


def load_checked_state_dict(net: torch.nn.Module, state: dict, what: str) -> None:
    """``load_state_dict`` (cast to float32), or a ``ValueError`` listing missing, unexpected and mis-shaped names."""
    check_fits(net, state, what)
    net.load_state_dict({k: v.float() for k, v in state.items()})
