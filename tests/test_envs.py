"""The pinned environments in envs/: each parses, pins every package exactly, resolves with pip, and holds
everything its jobs import. The last is checked by running the jobs' real commands in a Python that sees only
the environment's distributions (and what they require): a site folder of links to exactly those, and
`python -S`, so that nothing installed beside them can be imported by accident."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from helpers import REPO, extract_shard_args
from packaging.requirements import Requirement

from vlmstates.extraction.adapters import families

ENVS = REPO / "envs"
ENV_FILES = sorted(ENVS.glob("*.yaml"))
# Packages whose versions differ between families on purpose (Molmo's remote code needs transformers 4.48).
MAY_DIFFER = {"transformers", "tokenizers", "huggingface-hub"}
CONDA_PIN = re.compile(r"^[A-Za-z0-9_.-]+=\d[\w.]*$")
PIP_PIN = re.compile(r"^[A-Za-z0-9_.\[\],-]+==\d[\w.]*$")


def env_spec(path: Path) -> tuple[list[str], list[str]]:
    """(conda dependencies, pip dependencies) of an environment file."""
    spec = yaml.safe_load(path.read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    pip = [p for d in spec["dependencies"] if isinstance(d, dict) for p in d["pip"]]
    return conda, pip


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_pins(path: Path) -> dict[str, str]:
    return {normalise(Requirement(p).name): str(Requirement(p).specifier)[2:] for p in env_spec(path)[1]}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.stem)
def test_env_file_parses_and_pins_every_package_exactly(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["name"] == f"vlmstates-{path.stem}", path
    assert spec["channels"] == ["conda-forge", "nodefaults"], path
    conda, pip = env_spec(path)
    assert any(d.startswith("python=") for d in conda) and pip, path
    assert [d for d in conda if not CONDA_PIN.match(d)] == [], f"{path}: conda packages not pinned to one version"
    assert [p for p in pip if not PIP_PIN.match(p)] == [], f"{path}: pip packages not pinned with =="


def test_every_family_and_rule_has_its_environment():
    assert {f"{family}.yaml" for family in families()} <= {p.name for p in ENV_FILES}
    named = {
        m
        for rules in (REPO / "workflow" / "rules").glob("*.smk")
        for m in re.findall(r"envs/([\w{}]+)\.yaml", rules.read_text())
    }
    assert {name for name in named if "{" not in name} <= {p.stem for p in ENV_FILES}, named


def test_shared_packages_have_the_same_version_everywhere():
    """The numbers must not change with the environment a job ran in: numpy, torch, h5py... agree."""
    seen: dict[str, dict[str, str]] = {}
    for path in ENV_FILES:
        for name, version in pip_pins(path).items():
            seen.setdefault(name, {})[path.stem] = version
    differ = {
        name: versions for name, versions in seen.items() if len(set(versions.values())) > 1 and name not in MAY_DIFFER
    }
    assert differ == {}


# ------------------------------------------------------------------ constraints.txt: what the README installs
CONSTRAINTS = REPO / "constraints.txt"
# The environments whose pins the README's install must reproduce: every one but Molmo's, whose
# transformers 4.48.3 cannot share a Python environment with the native families' 5.x.
INSTALLED_WITH_README = [path for path in ENV_FILES if path.stem != "molmo"]


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("=="), f"constraints.txt: {line} is not an exact pin"
            pins[normalise(requirement.name)] = str(requirement.specifier)[2:]
    return pins


@pytest.mark.parametrize("path", INSTALLED_WITH_README, ids=lambda p: p.stem)
def test_constraints_hold_every_pin_of_the_environment(path):
    """One source of truth: the README's `-c constraints.txt` installs what the job environments pin."""
    pins = constraint_pins()
    differ = {name: (version, pins.get(name)) for name, version in pip_pins(path).items() if pins.get(name) != version}
    assert differ == {}, f"{path.name} pins (left) that constraints.txt lacks or pins otherwise (right)"


def test_every_pinned_library_of_constraints_comes_from_an_environment():
    """constraints.txt adds only the workflow and test tools, which no job environment holds."""
    from_envs = set().union(*(pip_pins(path) for path in INSTALLED_WITH_README))
    assert set(constraint_pins()) - from_envs == {"snakemake", "snakefmt", "pytest", "ruff"}


def test_the_running_environment_has_exactly_the_pinned_versions():
    """What the tests run against is what the environments pin; a local build label (torch's +cpu) is the
    same release. Fails on an install made without `-c constraints.txt`, which takes the newest releases."""
    from packaging.version import Version

    installed = {}
    for name in constraint_pins():
        try:
            installed[name] = Version(metadata.version(name)).public
        except metadata.PackageNotFoundError:
            installed[name] = None
    differ = {
        name: (version, installed[name]) for name, version in constraint_pins().items() if installed[name] != version
    }
    assert differ == {}, (
        "pinned (left) and installed (right) versions differ: pip install -e '.[test]' -c constraints.txt"
    )


def covering_env_files() -> list[Path]:
    """The environments whose pins no other one contains: if these resolve, every environment does (a
    subset of exact pins is satisfied by the same install)."""
    pins = {path: set(env_spec(path)[1]) for path in ENV_FILES}
    covering = []
    for path in ENV_FILES:
        wider = [other for other in ENV_FILES if other != path and pins[path] <= pins[other]]
        if not any(pins[path] < pins[other] or other in covering for other in wider):
            covering.append(path)
    return covering


def test_every_environment_is_covered_by_a_resolved_one():
    covering = covering_env_files()
    assert len(covering) < len(ENV_FILES)  # the identical family environments resolve once
    for path in ENV_FILES:
        assert any(set(env_spec(path)[1]) <= set(env_spec(c)[1]) for c in covering), path


@pytest.mark.slow
@pytest.mark.parametrize("path", covering_env_files(), ids=lambda p: p.stem)
def test_pip_part_resolves(path, tmp_path):
    """pip resolves the pins together (without conda: the conda part is only python and pip)."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(env_spec(path)[1]) + "\n")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{path}: the pins do not resolve:\n{result.stderr[-3000:]}"
    resolved = {
        normalise(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, version in pip_pins(path).items():
        assert resolved.get(name) == version, f"{path}: {name}=={version} resolved to {resolved.get(name)}"


# ------------------------------------------------------------------ jobs see only their environment
@cache
def _distribution_closure(names: tuple[str, ...]) -> frozenset[str]:
    """The installed distributions these names need, transitively (markers evaluated, extras not taken)."""
    todo, found = list(names), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in found:
            continue
        found.add(name)
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return frozenset(found)


def environment_site(env: str, root: Path) -> Path:
    """A site folder holding links to exactly the environment's distributions, as installed here."""
    site = root / f"site-{env}"
    if site.exists():
        return site
    site.mkdir(parents=True)
    for name in _distribution_closure(tuple(pip_pins(ENVS / f"{env}.yaml"))):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return site


def run_in_environment(env: str, root: Path, *args: str) -> str:
    site = environment_site(env, root)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environ["PYTHONPATH"] = f"{site}{os.pathsep}{REPO / 'src'}"
    result = subprocess.run(
        [sys.executable, "-S", "-m", "vlmstates", *args], env=environ, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"`vlmstates {' '.join(args)}` in envs/{env}.yaml:\n{result.stderr[-4000:]}"
    return result.stdout


def test_every_job_runs_the_package_in_its_environment_python_only(tmp_path):
    """Every job's command is `PYTHONPATH=<src> python -s -m vlmstates ...`: the environment's python, the
    project's code, and nothing from the caller's PYTHONPATH or user site-packages (no script: rules)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-p",
            "--forceall",
            "--cores",
            "1",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(REPO / "config" / "config.yaml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shell = "Shell command: "
    commands = [
        line.removeprefix(shell)
        for line in result.stdout.splitlines()
        if line.startswith(shell) and line != f"{shell}None"
    ]
    prefix = f"PYTHONPATH={REPO / 'src'} python -s -m vlmstates "
    assert len(commands) >= 6 and all(c.startswith(prefix) for c in commands), commands
    assert not re.search(
        r"^\s*(script|notebook|wrapper):",
        "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")),
        re.M,
    )


def test_the_site_folder_hides_what_the_environment_lacks(tmp_path):
    """The check's own premise: sklearn, installed here, is not importable in the core environment's site."""
    site = environment_site("core", tmp_path)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": str(site)}
    probe = "import importlib.util as u; print(u.find_spec('sklearn') is None, u.find_spec('h5py') is not None)"
    result = subprocess.run([sys.executable, "-S", "-c", probe], env=environ, capture_output=True, text=True)
    assert result.stdout.split() == ["True", "True"], result.stderr


@pytest.fixture(scope="module")
def core_demo(tmp_path_factory):
    """demo and validate, run in the core environment: (root, validated table of 3 questions, images)."""
    root = tmp_path_factory.mktemp("envs")
    run_in_environment("core", root, "demo", str(root / "demo"))
    table = root / "questions.csv"
    run_in_environment(
        "core",
        root,
        "validate",
        str(root / "demo" / "questions.csv"),
        str(root / "demo" / "images"),
        "--table",
        str(table),
        "--report-json",
        str(root / "v.json"),
        "--report-md",
        str(root / "v.md"),
        "--limit",
        "3",
    )
    return root, table, root / "demo" / "images"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "phi4_multimodal"])
def test_jobs_run_in_their_own_environments(family, core_demo):
    """tiny and extract-shard in the family's environment, then merge and inspect in the core one."""
    root, table, images = core_demo
    checkpoint = root / f"tiny-{family}"
    run_in_environment(family, root, "tiny", family, str(checkpoint))
    settings = {"name": family, "model": str(checkpoint), "batch_size": 2, "max_new_tokens": 2}
    shard = root / f"{family}_shard_0000.h5"
    run_in_environment(family, root, *extract_shard_args(settings, table, images, shard, shard_size=3))
    merged = root / f"{family}_embeddings.h5"
    run_in_environment("core", root, "merge", "--table", str(table), "--out", str(merged), str(shard))
    report = root / f"{family}_inspection"
    run_in_environment(
        "core",
        root,
        "inspect",
        str(merged),
        "--html",
        f"{report}.html",
        "--png",
        f"{report}.png",
        "--json",
        f"{report}.json",
    )
    assert json.loads(Path(f"{report}.json").read_text())["ok"] == 3


def test_the_readme_installs_with_the_constraints_ci_installs_with():
    """The README's two commands at the top and CI's install take the same pins (constraints.txt)."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^    (pip install .*)$", readme, re.M)[:2]
    assert [c.split(" && ")[0] for c in commands] == [
        'pip install -e ".[workflow]" -c constraints.txt',
        'pip install -e ".[test]" -c constraints.txt',
    ], commands
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()  # CI runs it word for word
