"""Model families built from :mod:`adaedge.nn`, their registry, and checkpoint loading.

>>> model = create("vared_r2plus1d_18", num_classes=10, width_mult=0.25)
>>> save_checkpoint(model, "ckpt.pt")                      # doctest: +SKIP
>>> model = load_model("ckpt.pt")                          # doctest: +SKIP

Each family is one :class:`~.registry.Family` entry, declared in its model file and listed once in
:data:`FAMILIES`.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnknownName
from . import adafocus as _adafocus
from . import adafuse as _adafuse
from . import tada2d as _tada2d
from . import vared_r2plus1d as _vared
from .adafocus_v3 import AdaFocusV3
from .adafuse import AdaFuse
from .registry import KINETICS_MEAN, KINETICS_STD, ExportOption, Family
from .tada2d import TAda2D
from .vared_r2plus1d import VaRedR2Plus1D

__all__ = ["create", "available", "families", "family", "family_of", "load_checkpoint",
           "save_checkpoint", "load_model", "read_checkpoint", "load_state", "CheckpointError",
           "Family", "ExportOption", "FAMILIES", "VaRedR2Plus1D", "TAda2D", "AdaFocusV3",
           "AdaFuse", "model_name", "model_config", "KINETICS_MEAN", "KINETICS_STD"]

FAMILIES: Tuple[Family, ...] = (_vared.FAMILY, _tada2d.FAMILY, _adafocus.FAMILY,
                                _adafuse.FAMILY)

_MODELS: Dict[str, Family] = {}
for _fam in FAMILIES:
    for _name in _fam.builders:
        if _name in _MODELS:
            raise RuntimeError(f"model {_name!r} is registered twice")
        _MODELS[_name] = _fam


def available() -> List[str]:
    return sorted(_MODELS)


def families() -> Dict[str, Family]:
    """The families by their manifest name ("vared", "tada", ...)."""
    return {f.name: f for f in FAMILIES}


def family_of(name: str) -> Family:
    """The family of a registered model name."""
    if name not in _MODELS:
        raise UnknownName(f"unknown model {name!r}; available: {', '.join(available())}")
    return _MODELS[name]


def family(name: str) -> str:
    """The family name (as manifests record it) of a registered model name."""
    return family_of(name).name


# Config values every family reads the same way, checked before a model is built (a negative
# class count reached PyTorch as a raw RuntimeError; a width of 0 exported an empty network).
COUNTS = {"num_classes": 1_000_000, "frames": 4096, "size": 8192, "input_frames": 4096,
          "patch": 8192, "search_space": 8}
SCALES = {"width_mult": 16.0}


def _check_config(name: str, config: Mapping[str, Any]) -> None:
    for key, value in config.items():
        if key in COUNTS and (isinstance(value, bool) or not isinstance(value, int)
                              or not 1 <= value <= COUNTS[key]):
            raise ConfigError(f"bad config for {name!r}: {key} must be an integer from 1 to "
                              f"{COUNTS[key]}, not {value!r}")
        if key in SCALES and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < float(value) <= SCALES[key]):
            raise ConfigError(f"bad config for {name!r}: {key} must be a number above 0 and at "
                              f"most {SCALES[key]:g}, not {value!r}")


def _check_keys(name: str, builder: Any, config: Mapping[str, Any]) -> None:
    """An unknown setting named in words, with the settings the model takes."""
    import inspect
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [k for k, p in params.items() if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                        inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ConfigError(f"bad config for {name!r}: {', '.join(map(repr, unknown))} "
                          f"{'is not a setting' if len(unknown) == 1 else 'are not settings'} "
                          f"of this model (it takes {', '.join(known)})")


def create(name: str, **config: Any) -> nn.Module:
    """Build a registered model with keyword config; the name and config are kept on the model."""
    builder = family_of(name).builders[name]
    _check_config(name, config)
    _check_keys(name, builder, config)
    try:
        model = builder(**config)
    except (TypeError, ValueError, RuntimeError) as e:
        import re
        found = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        if found:     # what the builder's signature did not show (it forwards **config)
            raise ConfigError(f"bad config for {name!r}: {found.group(1)!r} is not a setting "
                              "of this model (see its class's parameters in adaedge/models)"
                              ) from None
        raise ConfigError(f"bad config for {name!r}: {e}") from None
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
                    extra: Optional[Mapping[str, Any]] = None, float16: bool = False) -> None:
    """Save weights with the model's registry name and config, loadable with weights_only=True.

    ``float16=True`` stores float32 weight matrices and kernels (2 dimensions or more) as float16,
    half the file; loading widens them back, so the loaded model is the float16-rounded one (what
    an export of it computes, and what its card measured)."""
    state = model.state_dict()
    if float16:
        state = {k: (v.half() if v.dtype == torch.float32 and v.dim() >= 2 else v)
                 for k, v in state.items()}
    payload: Dict[str, Any] = {"adaedge": {"model": model_name(model), "config": model_config(model)},
                               "state_dict": state}
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
    _check_checkpoint_file(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text advises weights_only=False, which would run the file's code: never
        raise CheckpointError(
            f"checkpoint {p} holds Python objects beyond tensors and plain containers, which a "
            "safe load refuses (adaedge never unpickles code); save the state dict alone: "
            "torch.save(model.state_dict(), path)") from None
    except Exception as e:  # truncated files, foreign formats
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {p} ({type(e).__name__}"
                              f"{': ' + first if first else ''}): is it a complete file "
                              "torch.save wrote?") from None
    meta: Dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("adaedge"), dict):
        meta = dict(obj["adaedge"])
        for key, kinds, what in (("model", (str,), "a model name"),
                                 ("config", (dict,), "an object of settings"),
                                 ("labels", (list, type(None)), "a list of class names")):
            if key in meta and not isinstance(meta[key], kinds):
                raise CheckpointError(f"checkpoint {p}: its metadata's {key!r} must be {what}, "
                                      f"not {type(meta[key]).__name__}")
        if isinstance(meta.get("labels"), list) and \
                not all(isinstance(v, str) for v in meta["labels"]):
            raise CheckpointError(f"checkpoint {p}: its metadata's labels must be strings")
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


def _check_checkpoint_file(p: str) -> None:
    """Refuse what is plainly not a checkpoint before torch reads it, in words a user acts on."""
    if os.path.isdir(p):
        raise CheckpointError(f"checkpoint {p} is a folder; give the checkpoint file (.pt, .pth)")
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {p} does not exist")
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {p} is empty")
    if p.lower().endswith(".onnx"):
        raise CheckpointError(f"{p} is an ONNX graph, not a PyTorch checkpoint; give the .pt or "
                              ".pth file the training wrote")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":   # torch's zip archive, or a pickle
        raise CheckpointError(f"{p} is not a PyTorch checkpoint (neither torch.save's archive "
                              "nor a pickle)")


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    ks = sorted(keys)
    more = f" … and {len(ks) - limit} more" if len(ks) > limit else ""
    return ", ".join(ks[:limit]) + more


def check_shared(state: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Names that share one tensor in ``model`` (AdaFuse's shared policy layers appear under
    ``base_model.gate_fc0s.<key>`` and under every block's ``policy_net.gate_fc0``) must hold
    equal tensors in ``state``: two copies that differ mean a corrupt or edited file."""
    groups: Dict[int, List[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        for other in present[1:]:
            if state[other].shape == state[present[0]].shape and \
                    not torch.equal(state[other], state[present[0]]):
                raise CheckpointError(f"checkpoint {source}: {present[0]} and {other} are one "
                                      "shared tensor in the model but differ in the file")


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
    odd = sorted(k for k in set(own) & set(state)
                 if state[k].is_floating_point() != own[k].is_floating_point())
    if odd:
        raise CheckpointError(f"checkpoint {source}: {odd[0]} holds {state[odd[0]].dtype}, "
                              f"the model {own[odd[0]].dtype}")
    model.load_state_dict(dict(state), strict=True)   # float16 weights widen to the model's


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
    """Build the model a checkpoint was saved from and load its weights.

    adaedge's own files name their model and config; an official code's file is recognised by
    its family's entry (``Family.official``), which reads the config from it. ``name`` and
    ``config`` override or supply what the checkpoint does not record.
    """
    source = os.fspath(path)
    state, meta = read_checkpoint(path)
    saved_name = meta.get("model")
    if name is not None and saved_name is not None and name != saved_name:
        raise CheckpointError(f"checkpoint {source} is for model {saved_name!r}, not {name!r}")
    if name is not None:
        family_of(name)                      # an unknown name is refused before anything else
    official: Dict[str, Any] = {}
    if saved_name is None:
        for fam in FAMILIES:
            if fam.official is None:
                continue
            try:
                found = fam.official(state, meta, name)
            except ValueError as e:
                raise CheckpointError(f"checkpoint {source}: {e}") from None
            if found is not None:
                saved_name, official = found
                break
    name = name or saved_name
    if name is None:
        raise CheckpointError(f"checkpoint {source} does not say which model it is for: "
                              "name the model")
    if official:
        needs = family_of(name).official_needs.get(name, {})
        missing = [k for k in needs if k not in config]
        if missing:
            raise CheckpointError(
                f"checkpoint {source}: official {name} checkpoints do not record "
                f"{', '.join(missing)}: give {'them' if len(missing) > 1 else 'it'} (command "
                f"line: {' '.join(f'--config {k}={needs[k]}' for k in missing)}, with the "
                "values the model was trained with)")
    merged = dict(meta.get("config") or official)
    merged.update(config)
    if meta.get("config") and not config:  # the file's own config: sized before it is built
        _check_size(name, merged, state, source)   # (a user's override gets the key-by-key
                                                   # mismatch report of the strict load)
    model = create(name, **merged)
    load_state(model, state, source)
    return model


def _check_size(name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                source: str) -> None:
    """A small file must not make us allocate a huge model: build the configured model on
    PyTorch's meta device (no memory) and refuse it when it holds far more values than the
    file does (the strict load would refuse it anyway, after the allocation)."""
    held = sum(int(v.numel()) for v in state.values())
    try:
        with torch.device("meta"):
            probe = create(name, **config)
    except Exception:
        return                              # the real build names what is wrong
    wanted = sum(int(t.numel()) for t in list(probe.parameters()) + list(probe.buffers()))
    if wanted > 2 * held + 1_000_000:
        raise CheckpointError(f"checkpoint {source}: its config asks for a model of "
                              f"{wanted / 1e6:.1f}M values but the file holds "
                              f"{held / 1e6:.1f}M; refused before allocating it (a damaged or "
                              "edited config)")
