"""Value types of the command lines of ``python -m benchmarks`` (argparse ``type=``): a bad value is refused while the
options are parsed (exit status 2, one ``error:`` line naming the option and the value), before a model or data set
is loaded and before a negative count could slice the data from the end. Two checks need more than the value itself,
and run right after parsing: an l_inf radius (:func:`check_eps`, which needs ``--norm``) and the keys of a defense's
``--set`` (:func:`check_overrides`, which needs the defense)."""

from __future__ import annotations

import argparse
import json
import math
import os


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count of at least 1 (images, steps, batch rows, threads)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A seed, a start index, or a count where 0 means "skip"."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _number(text: str) -> float:
    """A finite decimal, or a fraction such as 8/255 (how radii are written in the papers)."""
    num, sep, den = text.partition("/")
    try:
        value = float(num) / float(den) if sep else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A number above 0 (an l_2 or l_1 radius, a noise level, minutes)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    """A number of at least 0 (a guidance weight, where 0 is the unguided ablation)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1]: an l_inf radius on [0, 1] images, a diffusion time."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def check_eps(parser: argparse.ArgumentParser, eps: float | None, norm: str) -> None:
    """Refuse an l_inf radius above 1: images are on [0, 1], so it would allow any image. (l_2 and l_1 radii may
    exceed 1, e.g. 2.0 under l_2 on MNIST, so the option's type checks only that the radius is positive.)"""
    if eps is not None and norm.lower() == "linf" and eps > 1:
        parser.error(f"argument --eps: an l_inf radius on [0, 1] images must be in (0, 1], got {eps:g}")


def check_overrides(defense: str, overrides: dict) -> None:
    """Refuse ``--set`` keys that the registry defense's wrapper class does not take, naming those it takes (else a
    TypeError from deep in its constructor, after the prior has loaded). A factory function, the user's or one
    registered as a wrapper, takes what it takes: not checked."""
    import inspect

    from benchmarks.defenses import REGISTRY

    wrapper = REGISTRY[defense].wrapper if defense in REGISTRY else None
    if not isinstance(wrapper, type) or not overrides:
        return
    taken = set()
    for cls in inspect.getmro(wrapper):  # the constructors a **kwargs hands the settings on to
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        taken |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    taken -= {"self", "algorithm", "prior", "classifier"}
    unknown = sorted(set(overrides) - taken)
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: not a setting of {defense}; it takes "
                         f"{', '.join(sorted(taken))}.")


def existing_path(text: str) -> str:
    """A file or folder that exists."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file or folder: {text!r}")
    return text


def device_name(text: str) -> str:
    """A torch device this machine has ("cpu", "cuda", "cuda:1")."""
    import torch  # here: the light commands need no torch to parse

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on 'cpu' or 'cuda'")
    return text


def prior_source(text: str) -> str:
    """'gaussian' (the closed-form prior) or the path of a prior file or folder."""
    return text if text == "gaussian" else existing_path(text)


def json_value(text: str):
    """A JSON value (settings, grids)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None


def defense_name(*, bare: bool = True, factories: bool = True, import_factories: bool = True):
    """The type of a defense option: a registry name, ``'none'`` (the bare classifier) where ``bare``, a user's
    factory ``'module:function'`` where ``factories``, imported here where ``import_factories`` (``attacks`` leaves
    that to the run, which skips a factory that does not import yet)."""
    def parse(text: str) -> str:
        from benchmarks.defenses import NO_DEFENSE, REGISTRY  # here: the light commands need no torch to parse

        if factories and ":" in text and text not in REGISTRY:
            if import_factories:
                _import_factory(text)
            return text
        if text in REGISTRY or (bare and text == NO_DEFENSE):
            return text
        others = [f"{NO_DEFENSE!r} (the bare classifier)"] * bare + ["a factory 'module:function'"] * factories
        raise argparse.ArgumentTypeError(f"unknown defense {text!r}: choose one of {sorted(REGISTRY)}"
                                         + "".join(f", {other}" for other in others))

    parse.__name__ = "defense"
    return parse


def _import_factory(spec: str) -> None:
    from benchmarks.factories import import_spec

    try:
        import_spec(spec)
    except (ImportError, AttributeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"cannot import the factory {spec!r}: {type(err).__name__}: {err}") from None
