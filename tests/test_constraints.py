"""constraints.txt pins every library the project declares (bar torch, pinned by the Makefile) to a version that
satisfies pyproject.toml, so `make setup` on a fresh machine installs the stack the results were published with."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"] + \
        project["optional-dependencies"]["trl"]
    pins = _pins()
    assert "torch" not in pins, "torch is pinned by the Makefile's TORCH_SPEC (CPU or CUDA build), not here"
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject.toml declares {spec!r})"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {spec!r}"
