"""What the checkpoint formats share: reading a network's state_dict against the network we build, strictly, with
errors that list what differs; and the config argument's forms (an object, a known name, a mapping)."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from torch import nn

from purifiers.priors.backends import load_state_dict_safely


def summary(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} entries ({', '.join(type(v).__name__ for v in obj[:6])})"
    return f"a {type(obj).__name__}"


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def mismatch(net: nn.Module, state: dict) -> tuple[list, list, list]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against ``net.state_dict()``."""
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in ours.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def describe_mismatch(missing, unexpected, shapes, n=5) -> str:
    parts = [f"{len(missing)} missing keys (first: {missing[:n]})" if missing else "",
             f"{len(unexpected)} unexpected keys (first: {unexpected[:n]})" if unexpected else "",
             f"{len(shapes)} shape mismatches (first: {shapes[:n]})" if shapes else ""]
    return "; ".join(p for p in parts if p)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a network on the meta device (no memory, no initialisation) to compare names and shapes."""
    with torch.device("meta"):
        return factory()


def load_strict(net_factory: Callable[[], nn.Module], state: dict, what: str) -> nn.Module:
    missing, unexpected, shapes = mismatch(build_on_meta(net_factory), state)
    if missing or unexpected or shapes:
        raise ValueError(f"{what}: the checkpoint does not match the network: "
                         f"{describe_mismatch(missing, unexpected, shapes)}.")
    net = net_factory()
    net.load_state_dict(state, strict=True)
    return net.eval()


def given_config(config, config_class, named_config, what: str):
    """``(config object, its name)`` for a config given as an object, a known name or a mapping; ``None`` when none
    was given (the caller infers it from the weights)."""
    if isinstance(config, config_class):
        return config, "given"
    if isinstance(config, str):
        return named_config(config), config
    if isinstance(config, dict):
        return config_class.from_mapping(config), "given"
    if config is not None:
        raise ValueError(f"{what} config must be a name, a mapping or a file, got {type(config).__name__}.")
    return None



def preset_config(config, presets: dict, what: str) -> dict | None:
    """A constructor-arguments config given as a dict, a preset name or a JSON file; ``None`` when none was given."""
    if config is None or isinstance(config, dict):
        return None if config is None else dict(config)
    if config in presets:
        return dict(presets[config])
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config) as f:
            return json.load(f)
    raise ValueError(f"{what} config {config!r} is neither a dict, a JSON file nor a preset ({sorted(presets)}).")


def read_state_dict(path: str, state: dict | None) -> dict:
    """``state``, or the state_dict read safely from ``path``; a clear error when it is not a flat name -> tensor dict."""
    state = load_state_dict_safely(path) if state is None else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict (a flat dict of name -> tensor).")
    return state


def matching_preset(state: dict, presets: dict, build, what: str) -> dict:
    """The preset whose network has exactly the names and shapes of ``state`` (compared on the meta device)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for config in presets.values():
        ours = build_on_meta(lambda: build(config)).state_dict()
        if {k: tuple(v.shape) for k, v in ours.items()} == shapes:
            return dict(config)
    raise ValueError(f"the {what} state_dict ({len(state)} tensors) matches none of the known configurations "
                     f"{sorted(presets)}; pass config= with the network's constructor arguments.")
