"""Readers for the deployment files (Dockerfile, compose.yaml, k8s/) that the deploy tests check.

Each reader returns plain data; the tests decide what must hold. Nothing here runs Docker or
Kubernetes: neither exists on the CI machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clickpulse.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "compose.yaml"
K8S_DIR = ROOT / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"

SETTING_NAMES = frozenset(setting.variable for setting in SETTINGS)


def find_tool(name: str) -> str | None:
    """A console script installed by pip: on PATH, or next to this Python's own scripts (where
    `pip install` puts them even when that directory is not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        candidate = Path(scripts) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


# -- Dockerfile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    arguments: str  # the rest of the logical line, continuations joined
    line: int  # where it starts, 1-based


@dataclass
class Dockerfile:
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def stages(self) -> list[list[Instruction]]:
        """Instructions grouped by build stage (each starts with FROM); global ARGs are dropped."""
        stages: list[list[Instruction]] = []
        for instruction in self.instructions:
            if instruction.keyword == "FROM":
                stages.append([])
            if stages:
                stages[-1].append(instruction)
        return stages

    def global_args(self) -> dict[str, str]:
        """ARGs before the first FROM, with their defaults: they may be used in FROM lines."""
        values: dict[str, str] = {}
        for instruction in self.instructions:
            if instruction.keyword == "FROM":
                break
            if instruction.keyword == "ARG":
                name, _, default = instruction.arguments.partition("=")
                values[name.strip()] = default.strip().strip('"')
        return values

    def final_stage(self) -> list[Instruction]:
        return self.stages()[-1]


def read_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comment lines are dropped, also inside a continued instruction
        if not stripped and not pending:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(part for part in pending if part)
        pending = []
        keyword, _, arguments = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    return Dockerfile(instructions)


def substitute(text: str, values: Mapping[str, str]) -> str:
    """`${NAME}` and `$NAME` as Docker expands them in FROM and LABEL lines (no defaults needed)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK/VOLUME."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def key_values(arguments: str) -> dict[str, str]:
    """ENV and LABEL lines in their `KEY=value KEY2="value two"` form."""
    pairs = {}
    for token in shlex.split(arguments):
        key, separator, value = token.partition("=")
        assert separator, f"expected KEY=value, got {token!r}"
        pairs[key] = value
    return pairs


@dataclass(frozen=True)
class Healthcheck:
    options: dict[str, str]
    command: list[str]  # without the leading "CMD"


def dockerfile_healthcheck(dockerfile: Dockerfile) -> Healthcheck:
    (instruction,) = [i for i in dockerfile.final_stage() if i.keyword == "HEALTHCHECK"]
    options: dict[str, str] = {}
    rest = instruction.arguments
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        rest = rest.lstrip()
    keyword, _, command = rest.partition(" ")
    assert keyword == "CMD", f"HEALTHCHECK must use CMD, got {keyword!r}"
    return Healthcheck(options, exec_form(command))


def final_stage_env(dockerfile: Dockerfile) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in dockerfile.final_stage():
        if instruction.keyword == "ENV":
            env.update(key_values(instruction.arguments))
    return env


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within one path element, `**` across elements."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern)
    translated = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(translated.get(part, re.escape(part)) for part in parts))


def dockerignore_admits(relative_path: str, path: Path = DOCKERIGNORE) -> bool:
    """Whether the build context keeps `relative_path`: the last pattern matching the path or one
    of its parent directories decides, `!` re-admits."""
    parts = relative_path.strip("/").split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    admitted = True
    for raw in path.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            admitted = negated
    return admitted


# -- compose.yaml -------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        value = environ.get(name)
        if operator == ":-" and not value:
            return default
        if operator == "-" and value is None:
            return default
        if operator in (":?", "?") and not value:
            raise ValueError(f"compose requires {name}: {default}")
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def read_compose(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml after interpolation with `environ` (an empty environment: the defaults)."""
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), environ or {}))


def compose_environment(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def compose_mounts(service: Mapping[str, Any]) -> list[Mount]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts.append(Mount(source, target, bool(mode) and "ro" in mode[0].split(",")))
        else:
            mounts.append(Mount(volume["source"], volume["target"], bool(volume.get("read_only"))))
    return mounts


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str | None
    host_port: int
    container_port: int


def compose_ports(service: Mapping[str, Any]) -> list[PublishedPort]:
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append(PublishedPort(port.get("host_ip"), int(port["published"]), int(port["target"])))
            continue
        *host, container = str(port).split(":")
        host_ip = host[0] if len(host) == 2 else None
        ports.append(PublishedPort(host_ip, int(host[-1]), int(container.split("/")[0])))
    return ports


def healthcheck_command(test: list[str] | str) -> list[str]:
    """A compose healthcheck `test` as an argv list (for CMD; CMD-SHELL runs through sh -c)."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *command = test
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(command)]
    assert kind == "CMD", f"unexpected healthcheck test kind {kind!r}"
    return command


# -- k8s/ ---------------------------------------------------------------------------------------


def k8s_manifest_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.glob("*.y*ml") if path != KUSTOMIZATION)


def k8s_resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in k8s_manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def k8s_resource(kind: str) -> dict[str, Any]:
    (found,) = [document for _, document in k8s_resources() if document["kind"] == kind]
    return found


def kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())
