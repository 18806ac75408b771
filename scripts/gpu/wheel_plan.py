"""Which of a folder's wheels this Python must install: those whose distribution is missing,
plus any carried wheel that one of them needs where the installed version is too old. Wheels
for another Python are left out. Prints the chosen paths, one per line; says why for each
wheel on stderr (scripts/gpu-check.sh's log).

    python scripts/gpu/wheel_plan.py .gpu-wheels
"""

from __future__ import annotations

import importlib.metadata
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def installed_versions() -> dict[str, Version]:
    """Every distribution this interpreter sees (sys.path order: the first one found wins)."""
    found: dict[str, Version] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in found:
            found[name] = Version(dist.version)
    return found


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply here without extras."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def plan(folder: Path, installed: dict[str, Version], tags: set) -> tuple[list[Path], list[str]]:
    """(wheels to install, one log line per decision)."""
    log, wheels = [], {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        if not wheel_tags & tags:
            log.append(f"skip {path.name}: not for this Python")
        elif name in wheels:
            raise SystemExit(f"two wheels of {name} in {folder}: keep one (`make gpu-wheels` starts afresh)")
        else:
            wheels[name] = (path, version)
    chosen = {n for n in wheels if n not in installed}
    todo = sorted(chosen)
    while todo:  # what the chosen wheels need, from the folder where the installed one is too old
        for req in requirements(wheels[todo.pop()][0]):
            dep = canonicalize_name(req.name)
            have = wheels[dep][1] if dep in chosen else installed.get(dep)
            if have is not None and req.specifier.contains(have, prereleases=True):
                continue
            if dep in wheels and req.specifier.contains(wheels[dep][1], prereleases=True):
                log.append(f"need {req} (have {have or 'none'}): installing {wheels[dep][0].name}")
                chosen.add(dep)
                todo.append(dep)
            else:
                log.append(f"WARNING: unmet requirement {req} (have {have or 'none'}, no wheel for it here)")
    for name in sorted(set(wheels) - chosen):
        log.append(f"have {name} {installed[name]}: {wheels[name][0].name} not installed")
    for name in sorted(chosen):
        log.append(f"install {wheels[name][0].name}")
    return [wheels[n][0] for n in sorted(chosen)], log


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    paths, log = plan(Path(argv[0]), installed_versions(), set(sys_tags()))
    for line in log:
        print(line, file=sys.stderr)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
