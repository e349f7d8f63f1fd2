"""The registry of checkpoint formats: each format is one :class:`CheckpointFormat`, registered by its own module
(:mod:`~purifiers.priors.checkpoints.score_sde`, :mod:`~purifiers.priors.checkpoints.ncsnv2`,
:mod:`~purifiers.priors.checkpoints.edm`, :mod:`~purifiers.priors.checkpoints.guided_diffusion`) with
:func:`register_format`; :func:`load_checkpoint` reads a file through it. No file is ever unpickled in a way that
could run code: a format reads its file with ``torch.load(weights_only=True)`` / safetensors
(:func:`purifiers.priors.backends.load_state_dict_safely`) unless it brings a reader of its own (EDM's network
pickles, read by a restricted unpickler that executes nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from purifiers.priors.backends import Prior, load_state_dict_safely
from purifiers.priors.checkpoints.common import summary


@dataclass(frozen=True)
class CheckpointFormat:
    """One container format.

    :param matches: whether an object its ``read`` returned is of this format (detection when no format is named).
    :param load: ``(object, config or None, use the EMA weights) -> Prior``: builds the network, loads the weights
        strictly and wraps it in the prior of its convention.
    :param read: how a file of this format is read (default: weights only, nothing executed).
    :param suffixes: file endings that claim a file for this format before detection (for a format whose files
        only its own ``read`` can open).
    :param untrained: ``config name -> Prior`` with random weights (cost measurements without the file), or None.
    """

    name: str
    description: str
    matches: Callable[[object], bool]
    load: Callable[[object, object, bool], Prior]
    read: Callable[[str], object] = load_state_dict_safely
    suffixes: tuple[str, ...] = ()
    untrained: Callable[[str], Prior] | None = None


FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def detect_format(obj) -> str | None:
    """The name of the first registered format whose ``matches`` accepts ``obj``, or None."""
    return next((fmt.name for fmt in FORMATS.values() if fmt.matches(obj)), None)


def load_checkpoint(path: str, *, format: str | None = None, config=None, ema: bool = True) -> Prior:
    """Read ``path`` safely, detect (or check) its format and return its prior, with ``describe()`` naming the format,
    config and weights.

    :param format: a name of :data:`FORMATS`; detected when None.
    :param config: the network config: a known config name, a path to a JSON or YAML file (safe YAML only), or a dict;
        when None it is inferred from the checkpoint's parameter names and shapes.
    :param ema: use the EMA weights the container holds (the weights the authors sample and evaluate with).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; known: {', '.join(FORMATS)}.")
    if format is None:
        format = next((f.name for f in FORMATS.values() if f.suffixes and path.endswith(f.suffixes)), None)
    obj = (FORMATS[format].read if format else load_state_dict_safely)(path)
    detected = detect_format(obj)
    if format is None and detected is None:
        raise ValueError(f"cannot tell what checkpoint {path} is: {summary(obj)}. Known formats: "
                         + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values()) + ".")
    name = format or detected
    if not FORMATS[name].matches(obj):
        raise ValueError(f"{path} is not a {name} checkpoint ({FORMATS[name].description}): {summary(obj)}"
                         + (f"; it looks like {detected}." if detected else "."))
    try:
        prior = FORMATS[name].load(obj, read_config(config), ema)
    except ValueError as err:  # every refusal names the file
        if path in str(err):
            raise
        raise ValueError(f"{path}: {err}") from err
    prior.provenance = {"format": name, "file": os.path.basename(path), **prior.provenance}
    return prior


def read_config(config):
    """A config argument as given (None, a name, a dict or a dataclass), or the mapping parsed from a ``.json`` /
    ``.yaml`` / ``.yml`` file. YAML is read with ``yaml.safe_load``: files that need Python object tags (ncsnv2 writes
    its run's ``config.yml`` that way) are refused, and so is a file that does not hold a mapping."""
    if not isinstance(config, (str, os.PathLike)) or not os.path.splitext(os.fspath(config))[1]:
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist.")
    if not path.endswith((".json", ".yaml", ".yml")):
        raise ValueError(f"config {path}: expected a .json, .yaml or .yml file, or a known config name.")
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except yaml.constructor.ConstructorError as err:
        raise ValueError(f"config {path} needs unsafe YAML (it holds tags such as the Python object tag "
                         f"!!python/object:argparse.Namespace) and is not read. Copy its data: and model: sections "
                         f"into a plain YAML or JSON file, or use the repository's configs/*.yml. ({err.problem})"
                         ) from err
    except (ValueError, RecursionError, yaml.YAMLError) as err:  # JSON's and UTF-8's errors do not name the file
        raise ValueError(f"config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'} text: "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(mapping, dict):
        raise ValueError(f"config {path} holds {summary(mapping) if mapping is not None else 'nothing'}, not a "
                         "mapping of config fields.")
    return mapping



def untrained_prior(format: str, config: str) -> Prior:
    """The network of an authors' checkpoint (``format`` and the name of one of its configs, e.g. ``("score_sde",
    "vp/cifar10_ddpmpp_deep_continuous")``) in its prior wrapper, with random weights: what one evaluation of that
    network costs on a device can be measured without the file (``python -m benchmarks estimate``). It does not
    denoise."""
    known = [name for name, fmt in FORMATS.items() if fmt.untrained is not None]
    if format not in known:
        raise ValueError(f"no untrained network for format {format!r}; known: {', '.join(known)}.")
    return FORMATS[format].untrained(config)


#: The cards of the known public checkpoints (``purifiers/cards/*.json``).
CARDS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "cards")


def known_cards() -> list[dict]:
    cards = []
    for name in sorted(os.listdir(CARDS_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(CARDS_DIR, name)) as f:
                cards.append(json.load(f))
    return cards


def find_card(description: dict) -> dict | None:
    """The card of a known checkpoint with the format, config and parameter count that ``Prior.describe()`` reports
    (and, where the card names a file, the same file name), or None. The counts were taken from the reference
    implementations' networks."""
    for card in known_cards():
        if card["format"] != description.get("format"):
            continue
        config = card.get("config")
        if config not in (None, "inferred from the weights") and config != description.get("config"):
            continue
        if card.get("file_name") and description.get("file") and card["file_name"] != description["file"]:
            continue
        if card.get("parameters") is not None and card["parameters"] != description.get("parameters"):
            continue
        return card
    return None