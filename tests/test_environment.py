"""pyproject.toml and environment.yml agree, the environment has what pyproject declares, and the scripts parse.

pyproject.toml pins with ``==`` or gives a range (torch, so that Colab keeps its own build); environment.yml pins
every package with ``==``. Each pin must satisfy pyproject's specifier, both files must list the same packages,
and every declared package must be installed at an admitted version and import.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent


def pyproject_requirements(path: Path = REPO / "pyproject.toml") -> dict[str, Requirement]:
    """Every requirement of the project and its extras, by canonical name."""
    project = tomllib.loads(path.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    reqs = {}
    for line in lines:
        req = Requirement(line)
        reqs[canonicalize_name(req.name)] = req
    return reqs


def environment_pins(path: Path = REPO / "environment.yml") -> tuple[str | None, dict[str, str]]:
    """(the conda python version, {canonical name: pinned version}) from environment.yml's pip section.

    Raises ValueError naming the line for a pip entry that is not ``name==version`` (pip options such as
    ``--extra-index-url`` and the ``-e .`` install of the course package are allowed)."""
    env = yaml.safe_load(path.read_text())
    python, pins = None, {}
    for dep in env.get("dependencies", []):
        if isinstance(dep, str):
            m = re.fullmatch(r"python\s*=+\s*([\d.]+)", dep.strip())
            if m:
                python = m.group(1)
        elif isinstance(dep, dict) and "pip" in dep:
            for line in dep["pip"]:
                line = line.strip()
                if line.startswith("-"):
                    continue
                m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s;#]+)", line)
                if not m:
                    raise ValueError(f"environment.yml: pip entry {line!r} is not pinned as name==version")
                pins[canonicalize_name(m.group(1).split("[")[0])] = m.group(2)
    return python, pins


PYPROJECT = pyproject_requirements()
PYTHON, PINS = environment_pins()


def test_both_files_list_the_same_packages():
    missing = sorted(set(PYPROJECT) - set(PINS))
    extra = sorted(set(PINS) - set(PYPROJECT))
    assert not missing, f"environment.yml does not pin {', '.join(missing)}, which pyproject.toml declares"
    assert not extra, f"environment.yml pins {', '.join(extra)}, which pyproject.toml does not declare"


@pytest.mark.parametrize("name", sorted(set(PYPROJECT) & set(PINS)))
def test_environment_pin_satisfies_pyproject(name):
    spec: SpecifierSet = PYPROJECT[name].specifier
    pinned = PINS[name]
    assert spec.contains(Version(pinned), prereleases=True), (
        f"{name}: environment.yml pins {pinned}, but pyproject.toml asks for {name}{spec}"
    )


def test_environment_python_satisfies_requires_python():
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("requires-python", "")
    assert PYTHON, "environment.yml has no 'python=3.x' dependency"
    assert SpecifierSet(requires).contains(Version(PYTHON)), (
        f"environment.yml asks for python={PYTHON}, but pyproject.toml requires-python is {requires!r}"
    )


def test_comparison_is_sensible(tmp_path):
    """The checks above catch a disagreement and name the package."""
    (tmp_path / "environment.yml").write_text(
        "dependencies:\n  - python=3.11\n  - pip:\n    - --extra-index-url https://example.invalid\n"
        "    - torch==2.16.0\n    - PyYAML==6.0.3\n    - -e .\n"
    )
    _, pins = environment_pins(tmp_path / "environment.yml")
    assert pins == {"torch": "2.16.0", "pyyaml": "6.0.3"}
    assert not Requirement("torch>=2.4,<2.15").specifier.contains(Version(pins["torch"]))
    (tmp_path / "environment.yml").write_text("dependencies:\n  - pip:\n    - torch>=2\n")
    with pytest.raises(ValueError, match="'torch>=2' is not pinned"):
        environment_pins(tmp_path / "environment.yml")


def _import_names(dist: str) -> list[str]:
    """The top-level modules a distribution installs, the one named like it first."""
    tops = sorted(m for m, dists in md.packages_distributions().items()
                  if dist in {canonicalize_name(d) for d in dists} and not m.startswith("_"))
    alias = dist.replace("-", "_")
    return sorted(tops, key=lambda m: (m != alias, m))


@pytest.mark.parametrize("name", sorted(PYPROJECT))
def test_declared_package_is_installed_and_imports(name):
    req = PYPROJECT[name]
    try:
        installed = md.version(req.name)
    except md.PackageNotFoundError:
        pytest.fail(f"{name} is declared in pyproject.toml but not installed: run scripts/setup-venv.sh")
    assert req.specifier.contains(Version(installed), prereleases=True), (
        f"{name} {installed} is installed, but pyproject.toml asks for {req}: run scripts/setup-venv.sh"
    )
    modules = _import_names(name)
    assert modules, f"{name} is installed but provides no importable top-level module"
    importlib.import_module(modules[0])


def test_course_package_and_command_are_installed():
    assert shutil.which("course-run") or (Path(__import__("sys").executable).parent / "course-run").exists(), (
        "the course-run command is missing: run scripts/setup-venv.sh (pip install -e '.[notebooks,test]')"
    )


@pytest.mark.parametrize("script", [".ci/run", "scripts/setup-venv.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_targets_exist():
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), "course", "test", "exercises", "lab"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "scripts/setup-venv.sh" in proc.stdout and "--nbval-lax" in proc.stdout
