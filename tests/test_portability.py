"""Numeric portability: what adaedge computes is right on the processor it runs on, whichever
kernels ONNX Runtime, NumPy and torch chose there (AVX-512 VNNI, AVX2, SSE4.2).

Small on purpose: ``.ci/run`` runs this file again under an emulated Haswell (AVX2, no AVX-512,
no VNNI) through ``tests/emulated_cpu.sh``, about 15x slower than native, after the suite. There
``ADAEDGE_EXPECT_PROCESSOR`` names the class the emulated processor must read as, so a run that
silently ran natively (a launcher script QEMU did not follow) fails instead of passing.

* every kind of int8 form, on a convolution built to saturate (all weights of one sign near
  their channel's largest, activations near the top of their range): the kinds right here stay
  within the rounding bound below; the kinds :data:`~adaedge.bundle.int8.WRONG_ON` names for
  this processor break it (so the table the runtime refuses by is checked on each processor it
  names, both ways), and the runtime refuses them;
* every family's ``verify`` (its float32 pieces against PyTorch's float32 within the family's
  stated tolerance) on tiny random networks;
* a tiny VA-RED² calibrated in its default int8 form, each piece within ``PIECE_RTOL``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaedge import models, runtime
from adaedge.bundle import load as load_bundle
from adaedge.bundle.int8 import WRONG_ON, Int8Forms, wrong_here
from adaedge.calibration import int8 as int8_mod
from adaedge.calibration.int8 import PIECE_RTOL, TARGET_FORMS, calibrate_int8, verify_int8
from adaedge.errors import ProcessorError
from adaedge.export import export
from adaedge.runtime.processor import processor_class
from adaedge.verify import verify

C, H = 32, 8        # channels and frame size of the saturating convolution
# Rounding bound of the saturating convolution, worst case: every product is positive, so the
# sum's relative error is at most the largest product's: half a weight step (1/64 of the
# channel's largest weight for 7 bits, weights >= half of it: 0.5/64/0.5 = 0.0156) plus half an
# activation step (activations in [0.5, 1] of a [0, 1] range: 0.5/255/0.5 = 0.0039), plus the
# output's own half step (outputs within [0.5, 1] of their range: 0.0039); 0.024 in all. A
# saturated int16 pair sum (2 x 255 x 127 = 64770 clipped to 32767) loses up to half of it:
# errors of 0.1 and more.
ROUNDING = 0.024
SATURATED = 0.1


def test_the_processor_is_the_one_expected():
    """Under tests/emulated_cpu.sh the emulated class, so that an emulation that did not take
    effect fails here instead of passing as native."""
    expected = os.environ.get("ADAEDGE_EXPECT_PROCESSOR")
    if expected is None:
        pytest.skip("ADAEDGE_EXPECT_PROCESSOR not set (native run): class "
                    f"{processor_class()}")
    assert processor_class() == expected


def _saturating_conv(path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, (C, C, 3, 3)).astype(np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Conv", ["r", "w"], ["y"], pads=[1, 1, 1, 1])], "sat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, H])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.uniform(0.5, 1.0, (1, C, H, H)).astype(np.float32)
    x.flat[0] = 0.0     # the range's bottom, so that activations span [0, 1]
    return x


@pytest.mark.parametrize("target,form", [(t, f) for t, forms in TARGET_FORMS.items()
                                         for f in forms])
def test_every_int8_form_kind_is_right_here_or_refused(tmp_path, target, form):
    import onnxruntime as ort
    x = _saturating_conv(tmp_path / "f.onnx")
    store = int8_mod._Store(tmp_path)
    store.add("sat", {"x": x})
    q = int8_mod._quantize(onnx.load(tmp_path / "f.onnx"), store, "sat", "minmax", tmp_path,
                           target, form)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(tmp_path / "f.onnx"), so).run(None, {"x": x})[0]
    out = ort.InferenceSession(q, so).run(None, {"x": x})[0]
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    here = processor_class()
    if here in WRONG_ON.get(form, ()):
        assert err > SATURATED, f"{form} on {here}: {err:.4f}; WRONG_ON names it wrong here"
        assert wrong_here(Int8Forms({}, {}, {"target": target}, {}, form=form), here)
    else:
        assert err <= ROUNDING, f"{form} on {here}: {err:.4f} (saturated?)"


def test_full_range_forms_are_refused_where_wrong(tmp_path):
    """The runtime's refusal on this processor, without any override (a tiny AdaFocusV3: few
    pieces, so that it fits the emulated run)."""
    from .test_adafocus import tiny_focus
    out = tmp_path / "b"
    export(tiny_focus(seed=1), out, weights={"source": "test"})
    x = _clips(out, 4)
    calibrate_int8(out, x, min_clips=2, form="u8s8")
    forms = load_bundle(out).manifest.int8
    if processor_class() in WRONG_ON["u8s8"]:
        with pytest.raises(ProcessorError, match="wrong on this processor"):
            runtime.load(out, precision="int8")
    else:
        runtime.load(out, precision="int8").classify(x[:1])
    assert forms.kind == "u8s8" and forms.made_on == processor_class()


def test_the_default_int8_form_verifies_here_piece_by_piece(tmp_path):
    """Each piece of a tiny AdaFocusV3, fed the float network's inputs, within PIECE_RTOL (the
    rounding bound that tests/test_int8.py states), in the default form, on this processor."""
    from .test_adafocus import tiny_focus
    out = tmp_path / "b"
    export(tiny_focus(seed=1), out, weights={"source": "test"})
    x = _clips(out, 6)
    calibrate_int8(out, x, min_clips=2)
    report = verify_int8(out, x, min_clips=2)
    rows = [p for p in report.pieces if not p["piece"].endswith(".gate")]
    assert rows and all(0 < p["rel_error"] <= PIECE_RTOL for p in rows), report.text()


def _clips(bundle: Path, n: int) -> np.ndarray:
    shape = load_bundle(bundle).manifest.full_clip_shape
    return np.random.default_rng(0).standard_normal([n] + list(shape)).astype(np.float32)


def _family_models():
    from .conftest import tiny_model
    from .test_adafocus import tiny_focus
    from .test_adafuse import tiny_adafuse
    from .test_tada import tiny_tada
    return {"vared": lambda seed: tiny_model(seed, size=16, frames=4), "adafocus": tiny_focus,
            "adafuse": tiny_adafuse, "tada": tiny_tada}


@pytest.mark.parametrize("family", ["vared", "adafocus", "adafuse", "tada"])
def test_every_familys_verify_passes_here(family):
    """The float32 pieces against PyTorch's float32 at the family's stated tolerance (1e-4
    unless it states one): both sides lie a float32 rounding away from the exact result, about
    1e-6 relative at these depths (a few layers of 8-32 channels), so the bound holds with a
    margin of 100 on any kernel."""
    model = _family_models()[family](seed=1)
    work = Path(tempfile.mkdtemp(prefix="adaedge-port-"))
    try:
        models.save_checkpoint(model, work / "ckpt.pt")
        export(model, work / "b", weights={"source": "test"})
        report = verify(work / "b", checkpoint=work / "ckpt.pt", clips=1)
        assert report.ok, [c.to_json() for c in report.cases if not c.ok]
    finally:
        shutil.rmtree(work, ignore_errors=True)
