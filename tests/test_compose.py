"""Static checks of the container setup: docker-compose.yaml, .env.example and images/*/Dockerfile.

Offline and quick, no Docker needed: the Compose file is interpolated the way Compose does it, with
the values of .env.example, and validated against the Compose Specification's JSON schema vendored
in tests/data/compose-spec.json (source in tests/data/README.md).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from essp.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
IMAGES = ROOT / "images"
CONSTRAINTS = ROOT / "constraints.txt"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
WORKER_DOCKERFILES = [path for path in DOCKERFILES if path.parent.name.startswith("worker-")]

# Keys whose values are credentials (environment variables, JSON connection fields); *_FILE and
# *_CMD keys name where a credential is read from, not the credential.
CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|FERNET_KEY|TOKEN|REDISCLI_AUTH|ROOT_USER|^login$",
                            re.IGNORECASE)
NOT_A_CREDENTIAL_KEY = re.compile(r"_(FILE|CMD)$", re.IGNORECASE)
# Command-line flags whose next argument is a credential (e.g. redis-server --requirepass).
CREDENTIAL_FLAG = re.compile(r"^--?[\w-]*(pass|secret|token)[\w-]*$", re.IGNORECASE)
# A credential may only be a bare or required reference: ${VAR}, ${VAR:?message}, ${VAR?message};
# a ${VAR:-default} would put a literal default credential in the file.
CREDENTIAL_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:(?P<password>[^@/\s]*)@", re.IGNORECASE)
PLACEHOLDER = "change-me-"


# ------------------------------------------------------------------------------------------------
# Compose variable interpolation
# ------------------------------------------------------------------------------------------------

class InterpolationError(ValueError):
    """A ${...} that Compose would refuse, or a required variable without a value."""


_TOKEN = re.compile(
    r"""\$(?:
        (?P<escaped>\$)
      | \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}
      | (?P<named>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<invalid>)
    )""",
    re.VERBOSE,
)


def interpolate(text: str, env: Mapping[str, str], used: set[str] | None = None) -> str:
    """``text`` with Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``, ``${VAR+alt}`` and ``$$`` replaced.

    Stricter than Compose in one way: a plain ``${VAR}`` whose variable is not in ``env`` is an
    error (Compose would substitute an empty string with a warning). Names met go into ``used``.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        if name is None:
            raise InterpolationError(f"invalid interpolation at offset {match.start()} of {text!r}")
        if used is not None:
            used.add(name)
        op, arg = match.group("op"), match.group("arg") or ""
        if "$" in arg:
            raise InterpolationError(f"nested interpolation in {match.group(0)!r} is not supported here")
        value = env.get(name)
        if op is None:
            if value is None:
                raise InterpolationError(f"${{{name}}} has no value (missing from .env.example)")
            return value
        present = bool(value) if op.startswith(":") else value is not None
        kind = op[-1]
        if kind == "-":
            return value if present else arg
        if kind == "?":
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value
        return arg if present else ""  # "+"

    return _TOKEN.sub(replace, text)


def interpolate_tree(node: Any, env: Mapping[str, str], used: set[str] | None = None) -> Any:
    """Interpolate every string value of a parsed YAML document (keys are left alone, as Compose does)."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env, used) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env, used) for item in node]
    if isinstance(node, str):
        return interpolate(node, env, used)
    return node


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Compose .env file (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: not KEY=VALUE"
        assert key not in env, f"{path.name}:{number}: {key} is defined twice"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    """The Compose file as written (YAML anchors and merge keys resolved, ${...} not interpolated)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict), "docker-compose.yaml is not a mapping"
    return document


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    return interpolate_tree(raw_compose, env_example)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


# ------------------------------------------------------------------------------------------------
# The interpolation itself (so that the checks below can be trusted)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("$A/$${A}", {"A": "x"}, "x/${A}"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A:?m}", {"A": "x"}, "x"),
        ("${A:+alt}", {"A": "x"}, "alt"),
        ("${A:+alt}", {}, ""),
        ("redis://:${P}@redis:6379/1", {"P": "pw"}, "redis://:pw@redis:6379/1"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(
    ("text", "env"),
    [("${A:?set A}", {}), ("${A:?set A}", {"A": ""}), ("${A?set A}", {}), ("${A}", {}), ("$ x", {}),
     ("${A:-${B}}", {}), ("${1}", {})],
)
def test_interpolate_refuses(text: str, env: dict[str, str]) -> None:
    with pytest.raises(InterpolationError):
        interpolate(text, env)


# ------------------------------------------------------------------------------------------------
# docker-compose.yaml against the Compose Specification
# ------------------------------------------------------------------------------------------------

def test_vendored_schema_is_the_compose_spec() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema.get("title") == "Compose Specification"
    assert "$schema" in schema and "service" in schema["definitions"]
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_compose_file_validates_against_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda error: list(error.absolute_path))
    assert not errors, "docker-compose.yaml does not follow the Compose Specification:\n" + "\n".join(
        f"  at {'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors
    )


def test_compose_variables_are_all_in_env_example(raw_compose: dict[str, Any],
                                                  env_example: dict[str, str]) -> None:
    used: set[str] = set()
    interpolate_tree(raw_compose, env_example, used)
    assert used, "docker-compose.yaml reads no variable: where do its credentials come from?"
    missing = sorted(used - env_example.keys())
    assert not missing, f"variables used by docker-compose.yaml but not listed in .env.example: {missing}"
    unused = sorted(env_example.keys() - used)
    assert not unused, f"variables in .env.example that docker-compose.yaml does not use: {unused}"


def test_env_example_holds_placeholders_only(env_example: dict[str, str]) -> None:
    for key, value in env_example.items():
        if is_credential_key(key):
            assert value.startswith(PLACEHOLDER), f".env.example: {key} must be a {PLACEHOLDER}... value"


def test_env_file_is_git_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert ignored & {".env", "/.env"}, ".env (the real credentials) must be git-ignored"


def test_dependencies_are_defined_and_conditions_can_be_met(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on undefined service {target}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy, " \
                                                         f"but {target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", \
                    f"{target} is waited for as a one-shot but restarts"


# ------------------------------------------------------------------------------------------------
# Images: compose <-> images/*/Dockerfile
# ------------------------------------------------------------------------------------------------

def test_dockerfiles_exist() -> None:
    assert DOCKERFILES, "no images/*/Dockerfile"


def test_built_services_use_dockerfiles_under_images(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        assert isinstance(build, dict), f"{name}: give build as {{context, dockerfile}}"
        context = (ROOT / build.get("context", ".")).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        dockerfile = (context / build["dockerfile"]).resolve()
        assert dockerfile.is_file(), f"{name}: {build['dockerfile']} does not exist"
        assert dockerfile.parent.parent == IMAGES, \
            f"{name}: {build['dockerfile']} is not images/<name>/Dockerfile"
        assert service.get("image"), f"{name}: a built image needs an image: name"


def test_every_dockerfile_is_used_by_a_service(services: dict[str, dict[str, Any]]) -> None:
    used = {(ROOT / service["build"].get("context", ".") / service["build"]["dockerfile"]).resolve()
            for service in services.values() if isinstance(service.get("build"), dict)}
    unused = [str(path.relative_to(ROOT)) for path in DOCKERFILES if path.resolve() not in used]
    assert not unused, f"Dockerfiles no compose service builds: {unused}"


# ------------------------------------------------------------------------------------------------
# ESSP settings
# ------------------------------------------------------------------------------------------------

def test_essp_variables_are_settings_fields() -> None:
    fields = set(Settings.model_fields)
    for path in (COMPOSE_FILE, ENV_EXAMPLE):
        names = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b", path.read_text()))
        unknown = sorted(name for name in names if name[len(ENV_PREFIX):].lower() not in fields)
        assert not unknown, \
            f"{path.name} names ESSP variables that essp.settings.Settings does not have: {unknown}"


def test_essp_settings_in_compose_are_valid(services: dict[str, dict[str, Any]]) -> None:
    """The ESSP_* values each container gets build a Settings object (types, ranges, enums)."""
    checked = 0
    for service in services.values():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        essp = {key[len(ENV_PREFIX):].lower(): str(value) for key, value in environment.items()
                if key.startswith(ENV_PREFIX)}
        if essp:
            Settings.model_validate({**essp, "state_dir": "/nonexistent"})
            checked += 1
    assert checked, "no service gets ESSP_* settings"


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line:
            instruction, _, arguments = line.partition(" ")
            yield instruction.upper(), arguments.strip()
    assert not pending, f"{path}: dangling line continuation"


def stages(path: Path) -> list[dict[str, Any]]:
    """The build stages: base image reference (global ARGs substituted), alias, instructions."""
    global_args: dict[str, str] = {}
    result: list[dict[str, Any]] = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "ARG" and not result:
            name, _, default = arguments.partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
        elif instruction == "FROM":
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            image = interpolate(words[0], global_args)
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"image": image, "alias": alias, "instructions": []})
        else:
            assert result or instruction == "ARG", f"{path}: {instruction} before the first FROM"
            if result:
                result[-1]["instructions"].append((instruction, arguments))
    return result


def image_tag(reference: str) -> tuple[str | None, str | None]:
    """(tag, digest) of an image reference like registry:5000/org/name:tag@sha256:..."""
    name, _, digest = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2] if ":" in last else None
    return tag or None, digest or None


@pytest.mark.parametrize("reference", ["python:3.11-slim-bookworm", "reg:5000/a/b:1.2", "b@sha256:ab"])
def test_image_tag_recognises_pins(reference: str) -> None:
    assert any(image_tag(reference))


@pytest.mark.parametrize("reference", ["python", "reg:5000/a/b", "python:latest"])
def test_image_tag_recognises_floating_references(reference: str) -> None:
    tag, digest = image_tag(reference)
    assert digest is None and tag in (None, "latest")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_dockerfile_base_images_are_pinned(dockerfile: Path) -> None:
    aliases: set[str] = set()
    found = stages(dockerfile)
    assert found, f"{dockerfile}: no FROM"
    for stage in found:
        reference = stage["image"]
        if reference.lower() in aliases or reference == "scratch":
            continue
        tag, digest = image_tag(reference)
        assert digest or (tag and tag != "latest"), \
            f"{dockerfile.relative_to(ROOT)}: FROM {reference} is not pinned to a tag or digest"
        if stage["alias"]:
            aliases.add(stage["alias"].lower())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_dockerfile_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    final = stages(dockerfile)[-1]
    users = [arguments for instruction, arguments in final["instructions"] if instruction == "USER"]
    assert users, f"{dockerfile.relative_to(ROOT)}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":", 1)[0].strip()
    assert user not in {"root", "0", ""}, f"{dockerfile.relative_to(ROOT)}: final USER is {users[-1]}"


@pytest.mark.parametrize("dockerfile", WORKER_DOCKERFILES, ids=lambda path: path.parent.name)
def test_worker_image_entrypoint_is_essp(dockerfile: Path) -> None:
    final = stages(dockerfile)[-1]
    entrypoints = [json.loads(arguments) for instruction, arguments in final["instructions"]
                   if instruction == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ["essp"], \
        f"{dockerfile.relative_to(ROOT)}: ENTRYPOINT must be [\"essp\"]"


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+).*", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_gpu_image_torch_matches_constraints() -> None:
    args = {}
    for instruction, arguments in dockerfile_instructions(IMAGES / "worker-gpu" / "Dockerfile"):
        if instruction == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            args[name.strip()] = value.strip()
    pins = constraint_pins()
    assert args.get("TORCH_VERSION") == pins["torch"], "worker-gpu TORCH_VERSION differs from constraints.txt"
    assert args.get("TORCHVISION_VERSION") == pins["torchvision"], \
        "worker-gpu TORCHVISION_VERSION differs from constraints.txt"


# ------------------------------------------------------------------------------------------------
# No credential literals in docker-compose.yaml
# ------------------------------------------------------------------------------------------------

def is_credential_key(key: str) -> bool:
    return bool(CREDENTIAL_KEY.search(key)) and not NOT_A_CREDENTIAL_KEY.search(key)


def credential_literals(node: Any, key: str = "", where: str = "") -> Iterator[str]:
    """Places in the (uninterpolated) Compose document holding a credential that is not a ${...}."""
    if isinstance(node, dict):
        for child_key, value in node.items():
            yield from credential_literals(value, str(child_key), f"{where}/{child_key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from credential_literals(item, key, f"{where}[{index}]")
            if isinstance(item, str) and CREDENTIAL_FLAG.match(item) and index + 1 < len(node):
                following = str(node[index + 1])
                if not CREDENTIAL_REF.fullmatch(following):
                    yield f"{where}[{index + 1}] (the value of {item})"
    elif isinstance(node, str):
        if is_credential_key(key) and not CREDENTIAL_REF.fullmatch(node.strip()):
            yield where
        for match in URL_PASSWORD.finditer(node):
            if not CREDENTIAL_REF.fullmatch(match.group("password")):
                yield f"{where} (password in a URL)"
        if node.lstrip().startswith("{"):
            try:
                parsed = json.loads(node)
            except ValueError:
                return
            yield from credential_literals(parsed, key, f"{where}<json>")


def test_credential_literal_detection() -> None:
    bad = {"services": {"s": {
        "environment": {"POSTGRES_PASSWORD": "hunter2", "OK_PASSWORD": "${PW:?set PW}",
                        "PASSWORDS_FILE": "/run/secrets/pw",
                        "DEFAULTED_SECRET": "${S:-hunter2}",
                        "URL": "postgresql://u:hunter2@db/x", "GOOD_URL": "redis://:${PW}@r:6379/1",
                        "CONN": '{"login": "${U}", "password": "hunter2"}'},
        "command": ["redis-server", "--requirepass", "hunter2"]}}}
    found = list(credential_literals(bad))
    assert len(found) == 5, found


def credentials_on_command_lines(services: dict[str, Any]) -> Iterator[str]:
    """Compose-interpolated credentials (``${ESSP_REDIS_PASSWORD}``) in a service's command or entrypoint:
    they end up in the process's argv, which ``ps`` shows to every user of the host. (A ``$$VAR`` is the
    container's shell reading its own environment, e.g. into a file.)"""
    for name, service in services.items():
        for field in ("command", "entrypoint"):
            value = service.get(field) or []
            for index, item in enumerate([value] if isinstance(value, str) else value):
                for match in _TOKEN.finditer(str(item)):
                    variable = match.group("braced") or match.group("named")
                    if variable and is_credential_key(variable):
                        yield f"services/{name}/{field}[{index}]: ${{{variable}}}"


def test_credentials_on_command_lines_are_found() -> None:
    bad = {"r": {"command": ["redis-server", "--requirepass", "${PW_PASSWORD:?x}"]},
           "s": {"entrypoint": "sh -c 'run --token $API_TOKEN'"},
           "ok": {"command": ["sh", "-c", "printf '%s' \"$$PW_PASSWORD\" > /tmp/f && exec server /tmp/f"]}}
    assert len(list(credentials_on_command_lines(bad))) == 2


def test_no_credential_on_a_command_line(raw_compose: dict[str, Any]) -> None:
    found = list(credentials_on_command_lines(raw_compose["services"]))
    assert not found, f"credentials on command lines (ps shows them; pass them in a file): {found}"


def test_no_credential_literals_in_compose(raw_compose: dict[str, Any]) -> None:
    found = list(credential_literals(raw_compose))
    assert not found, f"credentials written as literals in docker-compose.yaml (use ${{VAR:?...}}): {found}"
