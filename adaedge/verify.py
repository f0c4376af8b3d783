"""Compare a bundle running on a backend with the PyTorch reference it was exported from.

Cases: free gates, then every branch forced at every gate in turn (branch 0 everywhere, branch 1
everywhere, ...), so every piece of the bundle runs; a bundle without gates (TAda2D) has one case.
Each program value (the output of every unit) is compared in program order; the first that differs
names the piece that produced it. With free gates the branch each gate chose must match too (the
family's registry entry says where the reference records its choices). A bundle with exit steps
(AdaFocusV3) adds one case per exit: every clip stops there, and its scores must match the
reference's prediction at that stage. A stream bundle (AdaFuse) is fed clips of ``window`` frames
one frame at a time, with free decisions and under each stored policy; every value named after a
reference module is compared at every frame, then the final scores.

Where the backend runs the program compiled into one graph for single clips
(:mod:`adaedge.runtime.compile`, ONNX Runtime), every case is run that way too, one clip per call:
the scores against the reference, and with free gates the branches against the pieces' run.

Tolerance (float32): max |runtime - reference| <= rtol * max |reference| per value, rtol = 1e-4
(:func:`relative_error`).

The reference needs PyTorch (the ``export`` extra); this module imports it only when a reference
is built, so :func:`relative_error` serves everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .bundle import Bundle, Manifest, Run, Switch
from .bundle import load as load_bundle
from .errors import BundleError, require
from .progress import Progress
from .runtime import Runtime
from .runtime import load as load_runtime

RTOL = 1e-4


def relative_error(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (in float64; 0 for empty arrays): the error every parity check in
    adaedge states its tolerance in."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")       # NaN would compare as no error (max(0, nan) is 0): never pass
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-12)


@dataclass
class CaseResult:
    name: str
    ok: bool
    max_rel_error: float
    problem: Optional[str] = None   # the first value or decision that differs, naming its piece

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "max_rel_error": self.max_rel_error,
                "problem": self.problem}


@dataclass
class Report:
    bundle: str
    rtol: float
    clips: int
    cases: List[CaseResult] = field(default_factory=list)
    backend: str = "onnxruntime"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def to_json(self) -> Dict[str, Any]:
        return {"bundle": self.bundle, "backend": self.backend, "rtol": self.rtol,
                "clips": self.clips, "ok": self.ok, "cases": [c.to_json() for c in self.cases]}


def reference_model(bundle: Bundle, checkpoint: Optional[Union[str, Path]] = None) -> Any:
    """The PyTorch model a bundle was exported from: its config, and the checkpoint's weights
    (or, for a bundle exported with random weights, the same seed)."""
    require("torch", "verifying against the PyTorch reference", "export")
    import torch

    from . import models
    info = bundle.manifest.model
    config = dict(info.get("config") or {})
    weights = info.get("weights") or {}
    if checkpoint is not None:
        model = models.create(info["name"], **config)
        models.load_checkpoint(model, checkpoint)
    elif weights.get("source") == "random" and isinstance(weights.get("seed"), int):
        torch.manual_seed(weights["seed"])
        model = models.create(info["name"], **config)
    else:
        raise BundleError("this bundle was exported from a checkpoint: pass the checkpoint "
                          "(--checkpoint) to verify against it")
    return model.eval()


def _capture(model: Any, names: List[str]) -> Tuple[Dict[str, Any], list]:
    """Hooks recording the output of each named module (program values are module names)."""
    store: Dict[str, Any] = {}
    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        if name in modules:
            def hook(mod: Any, inp: Any, out: Any, name: str = name) -> None:
                store[name] = out.detach()
            hooks.append(modules[name].register_forward_hook(hook))
    return store, hooks


def _piece_outputs(manifest: Manifest) -> List[str]:
    """Every value a run or switch step writes, in program order."""
    return [v for s in manifest.program if isinstance(s, (Run, Switch)) for v in s.outputs.values()]


def _reference_decisions(model: Any, switch: str) -> Optional[List[int]]:
    from . import models
    name = getattr(model, "adaedge_name", None)
    fam = models.family_of(name) if isinstance(name, str) else None
    if fam is None or fam.decisions is None:
        return None
    return fam.decisions(model, switch)


def compare(runtime: Runtime, model: Any, clips: np.ndarray,
            force: Optional[int], name: str, rtol: float = RTOL) -> CaseResult:
    """Run one case on both sides and compare every program value in program order."""
    import torch
    manifest = runtime.manifest
    store, hooks = _capture(model, _piece_outputs(manifest))
    set_policy = getattr(model, "set_policy", None)  # models without branches have none
    try:
        if set_policy is not None:
            set_policy(force)
        with torch.no_grad():
            logits = model(torch.from_numpy(clips))
    finally:
        if set_policy is not None:
            set_policy(None)
        for h in hooks:
            h.remove()
    store[manifest.output] = logits.detach()
    result = runtime.classify(clips, force=force, keep_values=True)
    worst = 0.0
    for step in manifest.program:
        if isinstance(step, Switch) and force is None and step.gate is not None:
            chosen = _reference_decisions(model, step.name)
            if chosen is not None:
                want = [step.branches[i].name for i in chosen]
                got = [t.branches.get(step.name) for t in result.traces]
                if want != got:
                    return CaseResult(name, False, worst,
                                      f"gate piece {step.gate.piece!r} chose {got}, the "
                                      f"reference chose {want}")
        if not isinstance(step, (Run, Switch)):
            continue
        for value in step.outputs.values():
            if value not in store:
                continue
            ref = store[value].numpy().astype(np.float64)
            got_v = result.values.get(value)
            if isinstance(step, Run) and step.layouts.get(value) == "NTCHW" and ref.ndim == 5:
                ref = ref.transpose(0, 2, 1, 3, 4)  # the module's (N, C, T, H, W)
            elif got_v is not None and ref.ndim == 4 and got_v.ndim == 5 and \
                    ref.size == got_v.size:
                ref = ref.reshape(got_v.shape)      # a 2D network's (N*T, C, H, W)
            if got_v is None or got_v.shape != ref.shape:
                return CaseResult(name, False, worst, f"value {value!r} missing or of shape "
                                  f"{None if got_v is None else got_v.shape}, expected {ref.shape}")
            err = relative_error(got_v, ref)
            worst = max(worst, err)
            if not err <= rtol:
                if isinstance(step, Switch):
                    used = sorted({t.branches.get(step.name, "?") for t in result.traces})
                    pieces = [b.piece for b in step.branches
                              if b.name in used and b.piece is not None]
                else:
                    pieces = [step.piece]
                return CaseResult(name, False, worst,
                                  f"value {value!r} from piece {', '.join(pieces)} differs: "
                                  f"relative error {err:.3g} > {rtol:g}")
    final = relative_error(result.scores, store[manifest.output].numpy())
    worst = max(worst, final)
    if not final <= rtol:
        return CaseResult(name, False, worst, f"scores differ: relative error {final:.3g}")
    return CaseResult(name, True, worst)


def _family(bundle: Bundle) -> Any:
    from . import models
    try:
        return models.family_of(str(bundle.manifest.model.get("name")))
    except KeyError:
        return None


def family_rtol(bundle: Bundle) -> float:
    """The tolerance a bundle's family states (``Family.verify_rtol``), else :data:`RTOL`."""
    fam = _family(bundle)
    return fam.verify_rtol if fam is not None and fam.verify_rtol is not None else RTOL


def random_clips(shape: List[int], seed: int, smooth: bool = False) -> np.ndarray:
    """Verify's clips: independent standard normal values, or (``smooth``) standard normal values
    on a grid of every 8th pixel, bilinearly interpolated (smooth random frames)."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.standard_normal(shape).astype(np.float32)
    n, c, t, h, w = shape
    coarse = rng.standard_normal((n * c * t, 1, h // 8 + 2, w // 8 + 2)).astype(np.float32)
    import torch
    fine = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(h, w),
                                           mode="bilinear", align_corners=True)
    return fine.numpy().reshape(shape).astype(np.float32)


def verify(bundle: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
           clips: int = 2, seed: int = 0, rtol: Optional[float] = None,
           backend: str = "onnxruntime", progress: Progress = None,
           **backend_options: Any) -> Report:
    """Verify a bundle against its PyTorch reference; see the module docstring for the cases.
    ``rtol`` defaults to the family's stated tolerance (1e-4 unless it states one)."""
    b = load_bundle(bundle)
    model = reference_model(b, checkpoint)
    if rtol is None:
        rtol = family_rtol(b)
    runtime = load_runtime(b, backend, **backend_options)
    fam = _family(b)
    x = random_clips([clips] + b.manifest.full_clip_shape, seed,
                     smooth=fam is not None and fam.verify_clips == "smooth")
    report = Report(str(bundle), rtol, clips, backend=runtime.backend.name)
    if b.manifest.window is not None:
        policies: List[Optional[str]] = [None, *runtime.policies]
        for k, policy in enumerate(policies):
            if progress:
                progress(k, len(policies), policy or "free")
            report.cases.append(compare_stream(runtime, model, x, policy, rtol))
            if runtime.backend.runs_graphs:
                report.cases.append(compare_compiled_stream(runtime, model, x, policy, rtol))
        if progress:
            progress(len(policies), len(policies), "done")
        return report
    switches = b.manifest.switches()
    n_branches = max((len(s.branches) for s in switches), default=0)
    cases: List[Tuple[str, Optional[int]]] = [("free gates", None)]
    names = switches[0].branches if switches else []
    for i in range(n_branches):
        cases.append((f"every gate forced to branch {i} ({names[i].name if i < len(names) else i})",
                      i))
    exits = [s.name for s in b.manifest.exits()]
    total = len(cases) + len(exits)
    for k, (name, force) in enumerate(cases):
        if progress:
            progress(k, total, name)
        report.cases.append(compare(runtime, model, x, force, name, rtol))
    for k, exit_name in enumerate(exits):
        if progress:
            progress(len(cases) + k, total, exit_name)
        report.cases.append(compare_exit(runtime, model, x, exit_name, k, rtol))
    if runtime.backend.runs_graphs:
        for name, force in cases:
            report.cases.append(compare_compiled(runtime, model, x, force, name, rtol))
        for k, exit_name in enumerate(exits):
            report.cases.append(compare_compiled_exit(runtime, model, x, k, rtol))
    if progress:
        progress(total, total, "done")
    return report


def _reference_logits(model: Any, clips: np.ndarray, force: Optional[int]) -> np.ndarray:
    import torch
    set_policy = getattr(model, "set_policy", None)
    try:
        if set_policy is not None:
            set_policy(force)
        with torch.no_grad():
            return model(torch.from_numpy(clips)).numpy().astype(np.float64)
    finally:
        if set_policy is not None:
            set_policy(None)


def compare_compiled(runtime: Runtime, model: Any, clips: np.ndarray, force: Optional[int],
                     name: str, rtol: float = RTOL) -> CaseResult:
    """One case on the compiled program, one clip per call: scores against the reference, and
    the branches (free gates) against the pieces' run of the same clips."""
    name = f"{name} (compiled, one clip per call)"
    ref = _reference_logits(model, clips, force)
    pieces = runtime.classify(clips, force=force, exits=False) if force is None else None
    worst = 0.0
    for i in range(clips.shape[0]):
        r = runtime.classify(clips[i:i + 1], force=force, exits=False)
        if r.traces[0].steps[0].piece != "compiled":
            return CaseResult(name, False, worst, "the runtime did not run the compiled program")
        err = relative_error(r.scores, ref[i:i + 1])
        worst = max(worst, err)
        if pieces is not None and r.traces[0].branches != pieces.traces[i].branches:
            return CaseResult(name, False, worst, f"clip {i}: the compiled program chose "
                              f"{r.traces[0].branches}, the pieces {pieces.traces[i].branches}")
        if not err <= rtol:
            return CaseResult(name, False, worst, f"clip {i}: scores differ: relative error "
                              f"{err:.3g} > {rtol:g}")
    return CaseResult(name, True, worst)


def compare_compiled_exit(runtime: Runtime, model: Any, clips: np.ndarray, index: int,
                          rtol: float = RTOL) -> CaseResult:
    """The compiled program with thresholds that stop every clip at exit ``index``."""
    import torch

    from .runtime.compile import EXIT, SCORES
    steps = runtime.manifest.exits()
    name = f"every clip exits at {steps[index].name} (compiled, one clip per call)"
    never = {"entropy": -1.0, "max_prob": 2.0, "max_logit": float("inf")}
    always = {"entropy": float("inf"), "max_prob": -1.0, "max_logit": float("-inf")}
    thresholds = {s.name: (always if k == index else never)[s.criterion]
                  for k, s in enumerate(steps)}
    exe = runtime.compiled({}, thresholds)
    with torch.no_grad():
        ref = model.stage_logits(torch.from_numpy(clips))[index].numpy().astype(np.float64)
    worst = 0.0
    for i in range(clips.shape[0]):
        out = exe.run({runtime.manifest.input["name"]: clips[i:i + 1]})
        if int(out[EXIT].reshape(-1)[0]) != index:
            return CaseResult(name, False, worst, f"clip {i} did not stop at {steps[index].name}")
        err = relative_error(out[SCORES], ref[i:i + 1])
        worst = max(worst, err)
        if not err <= rtol:
            return CaseResult(name, False, worst, f"clip {i}: scores differ: relative error "
                              f"{err:.3g} > {rtol:g}")
    return CaseResult(name, True, worst)


def compare_stream(runtime: Runtime, model: Any, clips: np.ndarray,
                   policy: Optional[str], rtol: float = RTOL) -> CaseResult:
    """A stream bundle fed the clips frame by frame: every value named after a module of the
    reference, at every frame, then the scores after the last frame."""
    import torch
    name = "stream, free decisions" if policy is None else f"stream, every switch by {policy!r}"
    manifest = runtime.manifest
    store, hooks = _capture(model, _piece_outputs(manifest))
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(clips)).numpy().astype(np.float64)
    finally:
        for h in hooks:
            h.remove()
    n, frames = clips.shape[0], clips.shape[2]
    state = runtime.initial_state(n)
    worst = 0.0
    result = None
    for t in range(frames):
        result = runtime.classify(clips[:, :, t:t + 1], force=policy, keep_values=True,
                                  state=state)
        state = result.state
        for value, ref_all in store.items():
            ref = ref_all.numpy().astype(np.float64)
            ref = ref.reshape((n, frames) + ref.shape[1:])[:, t]
            got = result.values.get(value)
            if got is None or got.shape != ref.shape:
                return CaseResult(name, False, worst, f"value {value!r} at frame {t} missing or "
                                  f"of shape {None if got is None else got.shape}, expected "
                                  f"{ref.shape}")
            err = relative_error(got, ref)
            worst = max(worst, err)
            if not err <= rtol:
                return CaseResult(name, False, worst, f"value {value!r} differs at frame {t}: "
                                  f"relative error {err:.3g} > {rtol:g}")
    assert result is not None
    final = relative_error(result.scores, logits)
    worst = max(worst, final)
    if not final <= rtol:
        return CaseResult(name, False, worst, f"scores after {frames} frames differ: relative "
                          f"error {final:.3g}")
    return CaseResult(name, True, worst)


def compare_compiled_stream(runtime: Runtime, model: Any, clips: np.ndarray,
                            policy: Optional[str], rtol: float = RTOL) -> CaseResult:
    """Each stream alone (one stream per call, so the compiled program runs), frame by frame from
    zero state: the scores after the last frame against the reference."""
    import torch
    name = ("stream, free decisions" if policy is None else f"stream, every switch by {policy!r}") \
        + " (compiled, one stream per call)"
    with torch.no_grad():
        ref = model(torch.from_numpy(clips)).numpy().astype(np.float64)
    worst = 0.0
    for i in range(clips.shape[0]):
        state = runtime.initial_state(1)
        for t in range(clips.shape[2]):
            r = runtime.classify(clips[i:i + 1, :, t:t + 1], force=policy, state=state)
            state = r.state
            if r.traces[0].steps[0].piece != "compiled":
                return CaseResult(name, False, worst, "the runtime did not run the compiled "
                                  "program")
        err = relative_error(r.scores, ref[i:i + 1])
        worst = max(worst, err)
        if not err <= rtol:
            return CaseResult(name, False, worst, f"stream {i}: scores after {clips.shape[2]} "
                              f"frames differ: relative error {err:.3g} > {rtol:g}")
    return CaseResult(name, True, worst)


def compare_exit(runtime: Runtime, model: Any, clips: np.ndarray, exit_name: str,
                 index: int, rtol: float = RTOL) -> CaseResult:
    """Every clip stopped at exit step ``exit_name``: its scores against the reference's
    prediction at that stage (``model.stage_logits(clips)[index]``)."""
    import torch
    name = f"every clip exits at {exit_name}"
    stage_logits = getattr(model, "stage_logits", None)
    if stage_logits is None:
        return CaseResult(name, False, 0.0, f"the reference {type(model).__name__} has no "
                          "stage_logits to compare exit stages with")
    with torch.no_grad():
        ref = stage_logits(torch.from_numpy(clips))[index].numpy().astype(np.float64)
    result = runtime.classify(clips, exit_at=exit_name)
    err = relative_error(result.scores, ref)
    if any(t.exit != exit_name for t in result.traces):
        return CaseResult(name, False, err, f"clips did not stop at {exit_name}")
    if not err <= rtol:
        return CaseResult(name, False, err, f"scores at {exit_name} differ: relative error "
                          f"{err:.3g} > {rtol:g}")
    return CaseResult(name, True, err)


__all__ = ["verify", "compare", "compare_stream", "compare_exit", "compare_compiled",
           "compare_compiled_exit", "compare_compiled_stream", "reference_model",
           "relative_error", "Report", "CaseResult", "RTOL"]
