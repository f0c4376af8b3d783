"""The lean runtime: the import rules of the house, checked on the source, and the runtime's
commands working where ``import torch`` fails (as on a device that installed the core alone).

Rules (``../shared/HOUSE.md``): the bundle format imports the standard library, NumPy and ONNX;
the runtime imports the format and its backends' own libraries, torch only inside the PyTorch
backend; export imports the format, models and nn; nothing but the CLI imports cli, demo or bench.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest

from adaedge import models, runtime
from adaedge.export import export

from .conftest import clips

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adaedge"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

FORMAT = {"numpy", "onnx", "adaedge.errors", "adaedge.bundle"}
RUNTIME_LIBS = {"onnxruntime", "tensorrt", "tensorrt_lean", "cuda", "polygraphy", "pycuda"}
RUNTIME = FORMAT | RUNTIME_LIBS | {"adaedge", "adaedge.progress", "adaedge.runtime"}
TORCH_SIDE = {"torch", "numpy", "onnx", "adaedge", "adaedge.errors", "adaedge.progress"}
RULES: List[Tuple[str, Set[str]]] = [   # module prefix -> what it may import (first match wins)
    ("adaedge.errors", set()),
    ("adaedge.progress", {"tqdm"}),
    ("adaedge.bundle", FORMAT),
    ("adaedge.runtime.backends.pytorch", RUNTIME | {"torch"}),
    ("adaedge.runtime", RUNTIME),
    ("adaedge.nn", TORCH_SIDE | {"adaedge.nn"}),
    ("adaedge.models", TORCH_SIDE | {"adaedge.nn", "adaedge.models"}),
    ("adaedge.export", TORCH_SIDE | FORMAT | {"adaedge.nn", "adaedge.models", "adaedge.export"}),
    ("adaedge.calibration", RUNTIME | {"adaedge.calibration", "adaedge.data"}),
    ("adaedge.data", {"numpy", "cv2", "adaedge.errors", "adaedge.data"}),   # no torch
    ("adaedge.serve", RUNTIME | {"pytriton", "tritonclient", "adaedge.serve"}),   # no torch
]
FRONT_DOORS = {"adaedge.cli", "adaedge.demo", "adaedge.bench", "adaedge.serve"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[Tuple[int, str]]:
    """Every module a file imports, at any depth (lazy imports inside functions too), as
    absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            if node.module is None or node.level:   # "from . import x": x may be a module
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"


def allowed(target: str, rule: Set[str], own: str) -> bool:
    top = target.split(".")[0]
    if top in STDLIB:
        return True
    if not target.startswith("adaedge"):
        return top in rule
    # adaedge modules: the rule's packages and their submodules; "adaedge" itself means only
    # the package's own namespace (its __version__), not everything under it
    if target == "adaedge":
        return "adaedge" in rule
    return any(target == r or target.startswith(r + ".") for r in rule if r != "adaedge") or \
        target.startswith(own + ".") or _is_name_in(target, rule)


def _is_name_in(target: str, rule: Set[str]) -> bool:
    """``from adaedge.bundle import Manifest`` yields ``adaedge.bundle.Manifest``: allowed with
    ``adaedge.bundle``; ``from .. import __version__`` yields ``adaedge.__version__``."""
    parent = target.rpartition(".")[0]
    return parent in rule and (parent != "adaedge" or target == "adaedge.__version__")


def test_the_import_rules_hold_in_the_source():
    broken: List[str] = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    checked: Dict[str, int] = {}
    for path in files:
        name = module_name(path)
        rule = next((r for prefix, r in RULES if name == prefix or name.startswith(prefix + ".")),
                    None)
        for line, target in imports(path):
            door = next((d for d in FRONT_DOORS if target == d or target.startswith(d + ".")), None)
            inside = door is not None and (name == door or name.startswith(door + "."))
            if door and not inside and name not in ("adaedge.cli", "adaedge.__main__"):
                broken.append(f"{name}:{line} imports the front door {target}")
            if rule is None:
                continue
            own = ".".join(name.split(".")[:3]) if name.startswith("adaedge.runtime.backends") \
                else ".".join(name.split(".")[:2])
            checked[name] = checked.get(name, 0) + 1
            if not allowed(target, rule, own):
                broken.append(f"{name}:{line} imports {target}")
    assert not broken, "import rules broken:\n" + "\n".join(broken)
    # the rules did apply to the packages they are about
    for prefix in ("adaedge.bundle", "adaedge.runtime", "adaedge.export", "adaedge.models"):
        assert any(n.startswith(prefix) for n in checked), prefix


def test_the_import_check_catches_a_forbidden_import(tmp_path):
    """The rule check itself: torch in the runtime, or the exporter in the format, is caught."""
    assert not allowed("torch", dict(RULES)["adaedge.runtime"], "adaedge.runtime")
    assert not allowed("adaedge.export.graph", dict(RULES)["adaedge.runtime"], "adaedge.runtime")
    assert not allowed("adaedge.models", dict(RULES)["adaedge.bundle"], "adaedge.bundle")
    assert allowed("torch", dict(RULES)["adaedge.runtime.backends.pytorch"],
                   "adaedge.runtime.backends.pytorch")
    assert allowed("adaedge.bundle.program", dict(RULES)["adaedge.runtime"], "adaedge.runtime")
    assert allowed("adaedge.__version__", dict(RULES)["adaedge.runtime"], "adaedge.runtime")
    fake = PACKAGE / "runtime"     # a relative import resolved from a runtime module's place
    src = tmp_path / "x.py"
    src.write_text("from ..export import graph\n", encoding="utf-8")
    resolved = [t for _, t in imports_at(src, fake / "x.py")]
    assert "adaedge.export" in resolved


def imports_at(src: Path, as_if: Path) -> Iterator[Tuple[int, str]]:
    """``imports`` of the file ``src`` as if it lay at ``as_if`` inside the package."""
    text = src.read_text(encoding="utf-8")
    name = module_name(as_if)
    package = name.rpartition(".")[0]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            yield node.lineno, ".".join(base + ([node.module] if node.module else []))


def test_the_core_install_is_the_runtime_alone():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    core = [line.split(">")[0].split("=")[0].strip()
            for line in cfg["options"]["install_requires"].splitlines() if line.strip()
            and not line.strip().startswith("#")]
    assert sorted(core) == ["numpy", "onnx", "onnxruntime"]
    extras = cfg["options.extras_require"]
    assert "torch" in extras["export"] and "opencv" in extras["demo"]
    assert "cuda-python" in extras["tensorrt"]
    for name in ("export", "demo", "tensorrt", "serve", "test", "all"):
        assert name in extras
    assert "nvidia-pytriton" in extras["serve"]


NO_TORCH = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    sys.modules["torch"] = None          # as on a device with the core install: no PyTorch
    import numpy as np
    import adaedge, adaedge.runtime
    from adaedge.errors import BackendUnavailable
    names = []
    for pkg in ("adaedge.bundle", "adaedge.runtime", "adaedge.serve"):
        mod = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
    names += ["adaedge.bench", "adaedge.calibration.exits", "adaedge.cli", "adaedge.verify",
              "adaedge.demo", "adaedge.data", "adaedge.plot", "adaedge.progress"]
    skipped = []
    for name in names:
        if name.startswith("adaedge.runtime.backends.pytorch"):
            skipped.append(name)
            continue
        importlib.import_module(name)
    out = {"imported": len(names) - len(skipped), "skipped": skipped, "errors": {}}
    from adaedge.runtime import available_backends, create_backend
    for name in available_backends():
        try:
            create_backend(name)
            out["errors"][name] = None
        except BackendUnavailable as e:
            out["errors"][name] = str(e)
    bundle, clips_path = sys.argv[1], sys.argv[2]
    data = np.load(clips_path)
    result = adaedge.runtime.load(bundle).classify(data["clips"])
    out["scores_error"] = float(np.abs(result.scores - data["scores"]).max())
    from adaedge.cli import main
    codes = {}
    for argv in (["info", bundle], ["build", bundle], ["bench", bundle, "--reps", "1",
                 "--warmup", "0", "--json", "-q"], ["verify", bundle], ["models"],
                 ["export", "vared_r2plus1d_18", "--random-weights", "--out", bundle + "-x"],
                 ["train"], ["demo", "--max-frames", "1"]):
        codes[argv[0]] = main(argv)
    out["codes"] = codes
    out["torch_loaded"] = sys.modules.get("torch") is not None
    print(json.dumps(out))
""")


def test_the_runtime_works_where_torch_cannot_be_imported(tmp_path, tiny_checkpoint):
    """A bundle exported here is loaded, built, run, benchmarked and inspected in a process
    where ``import torch`` fails; the commands that need PyTorch say which extra to install."""
    b = tmp_path / "b"
    model = models.load_model(tiny_checkpoint)
    export(model, b, weights={"source": "checkpoint", "file": "tiny.pt", "sha256": "0" * 64})
    x = clips(3).numpy()
    want = runtime.load(b).classify(x).scores
    np.savez(tmp_path / "clips.npz", clips=x, scores=want)
    # an empty cache: a demo bundle a user (or an earlier test) built would let 'demo' run
    env = dict(os.environ, ADAEDGE_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(b), str(tmp_path / "clips.npz")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] >= 15 and not out["torch_loaded"]
    assert out["errors"]["onnxruntime"] is None
    assert "needs TensorRT" in out["errors"]["tensorrt"]
    assert "need PyTorch" in out["errors"]["torch-cpu"]
    assert out["scores_error"] <= 1e-6
    codes = out["codes"]
    assert codes["info"] == codes["build"] == codes["bench"] == 0
    # the commands that need PyTorch fail with one line naming the extra
    for command in ("verify", "models", "export", "train", "demo"):
        assert codes[command] == 2, command
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("adaedge: error:")]
    assert len(lines) == 5 and all("'export' extra" in ln and "pip install" in ln
                                   for ln in lines), lines


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    from adaedge.cli import main
    monkeypatch.setitem(sys.modules, "cv2", None)
    assert main(["demo", "--bundle", "nowhere", "--max-frames", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'demo' extra" in err and "pip install 'adaedge[demo]'" in err


@pytest.mark.parametrize("name", ["onnxruntime", "tensorrt", "torch-cpu", "torch-cuda"])
def test_every_backend_keeps_the_contract(name):
    """Each registered backend is a Backend subclass that declares a summary and its options,
    and its constructor takes every option it declares."""
    import inspect

    from adaedge.runtime.backends import Backend, backend_class
    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name and cls.summary
    params = inspect.signature(cls.__init__).parameters
    for opt in cls.options:
        assert opt.name in params, (name, opt.name)


def _readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 2. "))
    return lines[start + 1]


def test_ci_runs_exactly_the_readmes_test_command():
    command = _readme_test_command()
    assert "python -m pytest -q" in command and "tests/test_serve.py" in command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith(command + " ") or line == command for line in ci)
    # and the emulated-CPU portability check after it
    assert any("tests/emulated_cpu.sh --cpu Haswell" in line and "test_portability.py" in line
               for line in ci[next(i for i, line in enumerate(ci) if line.startswith(command)):])


@pytest.mark.parametrize("suite,serve", [(1, 0), (0, 1), (0, 0)])
def test_the_readmes_test_command_never_hides_a_half(tmp_path, suite, serve):
    """The README's test command with pip and python replaced by stubs: a failing suite still
    runs the serving tests, each half's result is printed, and the command fails if either
    failed."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "log"
    (stubs / "pip").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "python").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1 $2" = "-m venv" ]; then
          mkdir -p "$3/bin"
          printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/pip"
          printf '#!/bin/sh\\necho serve >> {log}\\nexit {serve}\\n' > "$3/bin/python"
          chmod +x "$3/bin/pip" "$3/bin/python"
          exit 0
        fi
        echo suite >> {log}
        exit {suite}
        """))
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", _readme_test_command()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert log.read_text().split() == ["suite", "serve"]          # both halves ran
    assert f"main suite: exit {suite}; serving tests: exit {serve}" in done.stdout
    assert (done.returncode == 0) == (suite == 0 and serve == 0), done
