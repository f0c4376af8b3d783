"""Model families built from :mod:`adaedge.nn`, a registry, and checkpoint loading.

>>> model = create("vared_r2plus1d_18", num_classes=10, width_mult=0.25)
>>> save_checkpoint(model, "ckpt.pt")                      # doctest: +SKIP
>>> model = load_model("ckpt.pt")                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .adafocus_v3 import AdaFocusV3, adafocus_v3
from .adafuse import AdaFuse, adafuse_tsm_r50, adafuse_tsn_r50, check_shared, config_from_state
from .tada2d import TAda2D, config_from_official, tada2d
from .vared_r2plus1d import VaRedR2Plus1D, vared_r2plus1d_18

__all__ = ["create", "available", "register", "load_checkpoint", "save_checkpoint", "load_model",
           "CheckpointError", "VaRedR2Plus1D", "TAda2D", "AdaFocusV3", "AdaFuse", "model_name",
           "model_config"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_FAMILY: Dict[str, str] = {}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def register(name: str, builder: Callable[..., nn.Module], family: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder
    _FAMILY[name] = family


def available() -> List[str]:
    return sorted(_REGISTRY)


def family(name: str) -> str:
    _check_name(name)
    return _FAMILY[name]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available())}")


def create(name: str, **config: Any) -> nn.Module:
    """Build a registered model with keyword config; the name and config are kept on the model."""
    _check_name(name)
    try:
        model = _REGISTRY[name](**config)
    except TypeError as e:
        raise TypeError(f"bad config for {name!r}: {e}") from None
    model.adaedge_name = name  # type: ignore[assignment]
    model.adaedge_config = _jsonable(dict(config))  # type: ignore[assignment]
    return model


def model_name(model: nn.Module) -> str:
    name = getattr(model, "adaedge_name", None)
    if not isinstance(name, str):
        raise ValueError("this model was not built with adaedge.models.create")
    return name


def model_config(model: nn.Module) -> Dict[str, Any]:
    return dict(getattr(model, "adaedge_config", {}))


def _jsonable(config: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    json.dumps(out)  # raises TypeError for values a manifest could not hold
    return out


def save_checkpoint(model: nn.Module, path: "str | os.PathLike[str]",
                    extra: Optional[Mapping[str, Any]] = None) -> None:
    """Save weights with the model's registry name and config, loadable with weights_only=True."""
    payload: Dict[str, Any] = {"adaedge": {"model": model_name(model), "config": model_config(model)},
                               "state_dict": model.state_dict()}
    if extra:
        payload["adaedge"].update(dict(extra))
    torch.save(payload, os.fspath(path))


def read_checkpoint(path: "str | os.PathLike[str]") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint safely (``weights_only=True``): the state dict and adaedge's metadata.

    Accepts our own format, ``{"state_dict": ...}`` or ``{"model": ...}`` wrappers as training
    scripts save them (the official AdaFuse code's among them), the official TAdaConv code's
    ``{"model_state": ..., "cfg": json}`` (its
    config is returned as ``meta["official_cfg"]``), and bare state dicts; strips a DataParallel
    ``module.`` prefix.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from None
    meta: Dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("adaedge"), dict):
        meta = dict(obj["adaedge"])
    elif isinstance(obj, dict) and isinstance(obj.get("cfg"), str):
        meta = {"official_cfg": obj["cfg"]}
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {p} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, meta


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    ks = sorted(keys)
    more = f" … and {len(ks) - limit} more" if len(ks) > limit else ""
    return ", ".join(ks[:limit]) + more


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, naming missing, unexpected and mis-shaped keys on failure."""
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}")
        raise CheckpointError("\n".join(lines))
    check_shared(state, model, source)
    model.load_state_dict(dict(state), strict=True)


def load_checkpoint(model: nn.Module, path: "str | os.PathLike[str]") -> Dict[str, Any]:
    """Load ``path`` into ``model``; returns adaedge's metadata from the file (may be empty)."""
    state, meta = read_checkpoint(path)
    if meta.get("model") and getattr(model, "adaedge_name", None) not in (None, meta["model"]):
        raise CheckpointError(f"checkpoint {os.fspath(path)} is for model {meta['model']!r}, "
                              f"not {getattr(model, 'adaedge_name')!r}")
    load_state(model, state, os.fspath(path))
    return meta


def load_model(path: "str | os.PathLike[str]", name: Optional[str] = None,
               **config: Any) -> nn.Module:
    """Build the model a checkpoint was saved from (our format names it) and load its weights.

    ``name`` and ``config`` override or supply what the checkpoint does not record.
    """
    state, meta = read_checkpoint(path)
    saved_name = meta.get("model")
    if name is not None and saved_name is not None and name != saved_name:
        raise CheckpointError(f"checkpoint {os.fspath(path)} is for model {saved_name!r}, "
                              f"not {name!r}")
    official: Dict[str, Any] = {}
    if saved_name is None and meta.get("official_cfg") and name in (None, "tada2d"):
        try:
            official = config_from_official(meta["official_cfg"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint {os.fspath(path)}: {e}") from None
        saved_name = "tada2d"
    if saved_name is None and "new_fc.weight" in state and "base_model.conv1.weight" in state:
        if name not in ("adafuse_tsn_r50", "adafuse_tsm_r50"):
            raise CheckpointError(
                f"checkpoint {os.fspath(path)} looks like an official AdaFuse file, which does not "
                "record whether the network shifts channels in time: name the model "
                "(adafuse_tsn_r50 or adafuse_tsm_r50) and give frames")
        try:
            official = config_from_state(state)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {os.fspath(path)}: {e}") from None
    name = name or saved_name
    if name is None:
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not say which model it is for: "
                              "name the model")
    merged = dict(meta.get("config") or official)
    merged.update(config)
    model = create(name, **merged)
    load_state(model, state, os.fspath(path))
    return model


register("vared_r2plus1d_18", vared_r2plus1d_18, family="vared")
register("tada2d", tada2d, family="tada")
register("adafocus_v3", adafocus_v3, family="adafocus")
register("adafuse_tsn_r50", adafuse_tsn_r50, family="adafuse")
register("adafuse_tsm_r50", adafuse_tsm_r50, family="adafuse")
