"""docker-compose.yml and the Procfile, checked without a Docker engine.

What can be checked here is checked for real: every Procfile process has its service and
the same entry point; every command names something that exists (the console script and
its subcommand, an importable Celery app and its queues, an importable gunicorn factory
that builds the app and serves the health-check path); every ``PAPERMAIL_*`` variable is a
real setting; health checks and start order are in place. Each checker is also run on a
broken copy, so none of them can pass by accident.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROCFILE = ROOT / "Procfile"
PYPROJECT = ROOT / "pyproject.toml"

# Procfile process -> the compose service that runs it.
GUNICORN = ["gunicorn", "-c", "python:worker.web.gunicorn_conf"]
PROCESS_SERVICE = {"release": "migrate", "web": "web", "worker": "worker", "beat": "beat"}
APP_SERVICES = ("web", "worker", "beat")


def load_compose(text: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text() if text is None else text)


def load_procfile(text: str | None = None) -> dict[str, list[str]]:
    processes = {}
    for line in (PROCFILE.read_text() if text is None else text).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = shlex.split(command)
    return processes


def service_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------------
# Checkers: each returns the problems found (empty = fine)


def entry_point(argv: list[str]) -> tuple[str, ...]:
    """What a command runs, independent of tuning flags (concurrency, log level...)."""
    if not argv:
        return ()
    if argv[0] == "celery":
        queues = option(argv, "-Q", "--queues") or ""
        sub = next((a for a in argv[3:] if not a.startswith("-")), "")
        return ("celery", option(argv, "-A", "--app") or "", sub, *sorted(queues.split(",")))
    if argv[0] == "gunicorn":
        return ("gunicorn", gunicorn_target(argv), option(argv, "-c", "--config") or "")
    return tuple(a for a in argv if not a.startswith("-"))


# gunicorn options that take a value (the ones papermail's commands use).
_GUNICORN_VALUED = {"-c", "--config", "-b", "--bind", "-w", "--workers", "--access-logfile"}


def gunicorn_target(argv: list[str]) -> str:
    """The APP_MODULE argument: the first word that is neither an option nor its value."""
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in _GUNICORN_VALUED:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return ""


def check_command(argv: list[str], healthcheck_paths: tuple[str, ...] = ()) -> list[str]:
    """The command's program and its target exist and can be loaded."""
    if not argv:
        return ["empty command"]
    program = argv[0]
    if program == "papermail":
        scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
        if "papermail" not in scripts:
            return ["papermail is not a console script in pyproject.toml"]
        module_name, _, attr = scripts["papermail"].partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        path = []
        for word in argv[1:]:
            if word.startswith("-"):
                break
            if not isinstance(command, click.Group):
                break
            sub = command.get_command(click.Context(command), word)
            if sub is None:
                return [f"`papermail {' '.join([*path, word])}` is not a command"]
            command, path = sub, [*path, word]
        if isinstance(command, click.Group):
            return [f"`papermail {' '.join(path)}` is a group, not a command"]
        return []
    if program == "celery":
        app_name = option(argv, "-A", "--app")
        if not app_name:
            return ["celery command without -A APP"]
        module_name, _, attr = app_name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return [f"celery app module {module_name} does not import: {exc}"]
        from celery import Celery

        app = getattr(module, attr or "app", None)
        if not isinstance(app, Celery):
            return [f"{app_name} has no Celery app"]
        sub = entry_point(argv)[2]
        if sub not in ("worker", "beat"):
            return [f"celery subcommand {sub!r} is neither worker nor beat"]
        problems = []
        if sub == "worker":
            known = {q.name for q in app.conf.task_queues}
            queues = (option(argv, "-Q", "--queues") or "").split(",")
            problems += [f"worker consumes unknown queue {q!r}" for q in queues if q not in known]
            problems += queue_binding_problems(app, app.conf.task_queues)
        return problems
    if program == "gunicorn":
        target, conf = entry_point(argv)[1:]
        if not conf.startswith("python:"):
            return ["gunicorn runs without -c python:worker.web.gunicorn_conf (tokens in logs)"]
        try:
            conf_module = importlib.import_module(conf.removeprefix("python:"))
        except ImportError as exc:
            return [f"gunicorn config {conf} does not import: {exc}"]
        if not getattr(conf_module, "logger_class", None):
            return [f"gunicorn config {conf} sets no logger_class (tokens in access logs)"]
        match = re.fullmatch(r"([\w.]+):(\w+)(\(\))?", target)
        if not match:
            return [f"gunicorn target {target!r} is not module:app or module:factory()"]
        module_name, attr, call = match.groups()
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            return [f"gunicorn target {target} does not load: {exc}"]
        app = obj() if call else obj
        if not callable(app):
            return [f"gunicorn target {target} is not a WSGI application"]
        routes = {rule.rule for rule in app.url_map.iter_rules()}
        return [f"the web app has no route {p}" for p in healthcheck_paths if p not in routes]
    if program == "python" and argv[1:2] == ["-c"]:
        try:
            compile(argv[2], "<compose>", "exec")
        except SyntaxError as exc:
            return [f"python -c code does not compile: {exc}"]
        return []
    return [f"unknown program {program!r}"]


def queue_binding_problems(app: Any, queues: Any) -> list[str]:
    """Queues bound with the same exchange and key would each receive every task."""
    resolved = app.amqp.Queues(queues).values()  # Celery's defaults filled in
    bindings = Counter((q.exchange.name, q.routing_key) for q in resolved)
    return [f"queues share the binding {b}" for b, n in bindings.items() if n > 1]


def check_procfile(procfile: dict[str, list[str]], compose: dict[str, Any]) -> list[str]:
    problems = []
    services = compose.get("services", {})
    for process in ("release", "web", "worker", "beat"):
        if process not in procfile:
            problems.append(f"Procfile has no {process} process")
    for process, argv in procfile.items():
        name = PROCESS_SERVICE.get(process)
        if name is None:
            problems.append(f"Procfile process {process} has no compose service")
            continue
        if name not in services:
            problems.append(f"compose has no service {name} for the Procfile's {process}")
            continue
        mine, theirs = entry_point(argv), entry_point(service_argv(services[name]))
        if mine != theirs:
            problems.append(f"{process}: Procfile runs {mine}, compose service {name} {theirs}")
    return problems


def healthcheck_paths(service: dict[str, Any]) -> tuple[str, ...]:
    test = service.get("healthcheck", {}).get("test") or []
    text = test if isinstance(test, str) else " ".join(test)
    return tuple(urlsplit(u).path for u in re.findall(r"https?://[^\s'\"]+", text))


def check_commands(procfile: dict[str, list[str]], compose: dict[str, Any]) -> list[str]:
    problems = []
    for process, argv in procfile.items():
        paths = healthcheck_paths(compose["services"].get(PROCESS_SERVICE.get(process, ""), {}))
        problems += [f"Procfile {process}: {p}" for p in check_command(argv, paths)]
    for name, service in compose["services"].items():
        argv = service_argv(service)
        if argv:  # services on a stock image (postgres, redis, moto) run its default
            if "image" in service and "build" not in service and argv[0] != "python":
                continue
            problems += [
                f"service {name}: {p}" for p in check_command(argv, healthcheck_paths(service))
            ]
    # Every queue a task is routed to is consumed by some worker.
    from worker.tasks import app

    consumed = set()
    for argv in [service_argv(s) for s in compose["services"].values()] + list(procfile.values()):
        if entry_point(argv)[:1] == ("celery",) and entry_point(argv)[2:3] == ("worker",):
            consumed |= set(entry_point(argv)[3:])
    routed = {r["queue"] for r in app.conf.task_routes.values()} | {app.conf.task_default_queue}
    problems += [f"no worker consumes queue {q!r}" for q in sorted(routed - consumed)]
    return problems


def environment_names(compose: dict[str, Any], raw: str) -> set[str]:
    names = set()
    for service in compose.get("services", {}).values():
        env = service.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        names |= {k for k in keys if k.startswith("PAPERMAIL_")}
    names |= set(re.findall(r"\$\{?(PAPERMAIL_[A-Z0-9_]+)", raw))
    return names


def check_environment(compose: dict[str, Any], raw: str) -> list[str]:
    from worker.config import ENV_PREFIX, Settings

    fields = set(Settings.model_fields)
    names = environment_names(compose, raw)
    problems = [
        f"{n} is not a papermail setting"
        for n in sorted(names)
        if n.removeprefix(ENV_PREFIX).lower() not in fields
    ]
    app_env = [compose["services"].get(s, {}).get("environment") or {} for s in APP_SERVICES]
    for needed in ("PAPERMAIL_DATABASE_URL", "PAPERMAIL_BROKER_URL", "PAPERMAIL_SECRET_KEY"):
        if not all(needed in env for env in app_env):
            problems.append(f"{needed} is not set for every app service")
    return problems


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def check_health_and_order(compose: dict[str, Any]) -> list[str]:
    services = compose.get("services", {})
    problems = []
    for name in ("postgres", "redis", "web"):
        if not services.get(name, {}).get("healthcheck", {}).get("test"):
            problems.append(f"service {name} has no health check")
    redis_cmd = " ".join(service_argv(services.get("redis", {})))
    if "--maxmemory-policy noeviction" not in redis_cmd:
        problems.append("redis does not run with --maxmemory-policy noeviction")
    if "--appendonly yes" not in redis_cmd:
        problems.append("redis does not persist its queue (--appendonly yes)")
    if not str(services.get("ses", {}).get("image", "")).startswith("motoserver/moto"):
        problems.append("no moto server (motoserver/moto) as the SES-compatible API")
    if entry_point(service_argv(services.get("migrate", {}))) != ("papermail", "db", "upgrade"):
        problems.append("the migrate service does not run `papermail db upgrade`")
    expected = {
        "migrate": {"postgres": "service_healthy"},
        "web": {"migrate": "service_completed_successfully", "postgres": "service_healthy"},
        "worker": {
            "migrate": "service_completed_successfully",
            "postgres": "service_healthy",
            "redis": "service_healthy",
        },
        "beat": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
    }
    for name, wants in expected.items():
        deps = _depends(services.get(name, {}))
        for dep, condition in wants.items():
            if deps.get(dep) != condition:
                problems.append(f"{name} does not wait for {dep} ({condition})")
    for name, service in services.items():
        for dep, condition in _depends(service).items():
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
            elif condition == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{name} waits for {dep} to be healthy, which has no check")
            elif condition == "service_completed_successfully" and services[dep].get(
                "restart", "no"
            ) not in ("no", False):
                problems.append(f"{name} waits for one-shot {dep}, which restarts")
    # The URLs the app gets point at the services that exist.
    for name in APP_SERVICES:
        env = services.get(name, {}).get("environment") or {}
        for var, target in (
            ("PAPERMAIL_DATABASE_URL", "postgres"),
            ("PAPERMAIL_BROKER_URL", "redis"),
            ("PAPERMAIL_SES_ENDPOINT_URL", "ses"),
        ):
            host = urlsplit(str(env.get(var, ""))).hostname
            if host != target:
                problems.append(f"{name}: {var} points at {host!r}, not the {target} service")
    return problems


# ---------------------------------------------------------------------------------------
# The real files


@pytest.fixture
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture
def procfile() -> dict[str, list[str]]:
    return load_procfile()


def test_every_procfile_process_has_its_service(
    procfile: dict[str, list[str]], compose: dict[str, Any]
) -> None:
    assert set(procfile) == set(PROCESS_SERVICE)
    assert check_procfile(procfile, compose) == []


@pytest.fixture
def production_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The isolated environment with a real signing key: the web app refuses the dev one."""
    from worker import config

    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", "k" * 48)
    config.reset_settings()
    return env


def test_every_command_names_a_real_entry_point(
    production_env: dict[str, str], procfile: dict[str, list[str]], compose: dict[str, Any]
) -> None:
    assert check_commands(procfile, compose) == []


def test_every_papermail_variable_is_a_setting(compose: dict[str, Any]) -> None:
    raw = COMPOSE.read_text()
    names = environment_names(compose, raw)
    assert "PAPERMAIL_BROKER_URL" in names and len(names) >= 8
    assert check_environment(compose, raw) == []


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    assert check_health_and_order(compose) == []


def test_settings_of_the_stack_load(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app services' environment is a valid configuration (substitutions filled)."""
    from worker.config import load_settings

    env = compose["services"]["worker"]["environment"]
    values = {}
    for key, value in env.items():
        value = str(value)
        subst = re.fullmatch(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}", value)
        if subst:
            value = subst.group(2) if subst.group(2) is not None else "x" * 64
            if key == "PAPERMAIL_BASE_URL" and subst.group(2) is None:
                value = "https://papermail.example.org"  # what the operator puts in .env
        values[key.removeprefix("PAPERMAIL_").lower()] = value
    settings = load_settings(**values)
    assert settings.mailer == "ses" and settings.broker_url


def test_dockerfile_builds_the_package_with_its_data() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for needed in ("COPY worker", "COPY migrations", "COPY templates", "pip install"):
        assert needed in text, needed
    assert re.search(r"^USER (?!root)", text, re.M), "the image runs as a non-root user"


# ---------------------------------------------------------------------------------------
# The checkers catch what they are for


def test_checkers_catch_a_broken_stack(env: dict[str, str], compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    services = broken["services"]
    services["redis"]["command"] = ["redis-server", "--maxmemory-policy", "allkeys-lru"]
    del services["web"]["healthcheck"]
    services["worker"]["depends_on"]["migrate"] = {"condition": "service_started"}
    services["beat"]["depends_on"]["ghost"] = {"condition": "service_healthy"}
    services["worker"]["environment"]["PAPERMAIL_BROKER"] = "redis://redis:6379/0"
    services["worker"]["environment"]["PAPERMAIL_DATABASE_URL"] = "postgresql://x@db/x"
    raw = COMPOSE.read_text() + "\n# ${PAPERMAIL_NOT_A_SETTING}\n"
    problems = check_health_and_order(broken) + check_environment(broken, raw)
    text = "\n".join(problems)
    assert "noeviction" in text
    assert "web has no health check" in text
    assert "worker does not wait for migrate" in text
    assert "unknown service ghost" in text
    assert "PAPERMAIL_BROKER is not a papermail setting" in text
    assert "PAPERMAIL_NOT_A_SETTING is not a papermail setting" in text
    assert "PAPERMAIL_DATABASE_URL points at 'db'" in text


def test_checkers_catch_wrong_commands(
    production_env: dict[str, str], compose: dict[str, Any]
) -> None:
    assert check_command(["papermail", "db", "upgrayedd"]) == [
        "`papermail db upgrayedd` is not a command"
    ]
    assert check_command(["papermail", "db"]) == ["`papermail db` is a group, not a command"]
    assert "does not import" in check_command(["celery", "-A", "worker.nope", "worker"])[0]
    assert check_command(["celery", "-A", "worker.tasks", "worker", "-Q", "plan,mail"]) == [
        "worker consumes unknown queue 'mail'"
    ]
    from kombu import Queue

    from worker.tasks import app

    assert queue_binding_problems(app, [Queue("plan"), Queue("send")]) == [
        "queues share the binding ('plan', 'plan')"
    ]
    assert (
        "no route /health" in check_command([*GUNICORN, "worker.web:create_app()"], ("/health",))[0]
    )
    assert "does not load" in check_command([*GUNICORN, "worker.web:make_app()"])[0]
    assert "without -c" in check_command(["gunicorn", "worker.web:create_app()"])[0]
    assert "does not import" in check_command(["gunicorn", "-c", "python:worker.nope", "x:y"])[0]
    procfile = load_procfile(
        "release: papermail db upgrade\n"
        "web: gunicorn -c python:worker.web.gunicorn_conf 'worker.web:create_app()' "
        "--bind 0.0.0.0:$PORT\n"
        "worker: celery -A worker.tasks worker -Q send\n"
        "clock: celery -A worker.tasks beat\n"
    )
    problems = check_procfile(procfile, compose) + check_commands(procfile, compose)
    text = "\n".join(problems)
    assert "Procfile has no beat process" in text
    assert "clock has no compose service" in text
    assert "worker: Procfile runs" in text  # -Q send vs -Q plan,send
