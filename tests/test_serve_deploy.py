"""deploy/: the KServe ServingRuntime and InferenceService and the Kubernetes Deployment
parsed, with the fields each kind requires, and their arguments, ports and probes checked
against what `gpu-mdf serve` offers (no cluster here)."""

import yaml
from click.testing import CliRunner
from serve_helpers import ROOT

from gpu_mdf.cli import main
from gpu_mdf.serve.endpoints import ROUTES

DEPLOY = ROOT / "deploy"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def serve_options(args: list[str]) -> dict:
    """``args`` parsed by the serve command itself (an unknown option or a bad value fails)."""
    assert args[0] == "serve", args
    command = main.commands["serve"]
    ctx = command.make_context("serve", list(args[1:]))
    return ctx.params


def port_of(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == ref)


def health_paths() -> set[str]:
    return {r.template for r in ROUTES if r.template.startswith("/v2/health/")}


def test_kubernetes_deployment_probes_ports_and_arguments():
    deployment, service = docs("kubernetes-deployment.yaml")
    assert deployment["apiVersion"] == "apps/v1" and deployment["kind"] == "Deployment"
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] and container["image"]
    options = serve_options(container["args"])
    assert options["host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": options["port"], "grpc": options["grpc_port"]}
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert {live["path"], ready["path"]} == {"/v2/health/live", "/v2/health/ready"} <= health_paths()
    assert port_of(container, live["port"]) == port_of(container, ready["port"]) == options["port"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert options["repository"] in mounts
    assert any(options["token_file"].startswith(m + "/") for m in mounts)
    volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 30       # the server drains for 30 s
    assert service["kind"] == "Service" and service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_kserve_servingruntime_and_inferenceservice_agree():
    (runtime,) = docs("kserve-servingruntime.yaml")
    (isvc,) = docs("kserve-inferenceservice.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"]
    options = serve_options(container["args"])
    assert options["repository"] == "/mnt/models" and options["host"] == "0.0.0.0"   # where KServe puts models
    (port,) = container["ports"]
    assert port["containerPort"] == options["port"] and port["name"] == "http1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] == "v2" and model["storageUri"]


def test_the_runtime_image_starts_the_server_these_files_configure():
    text = (ROOT / "Dockerfile.cuda").read_text()
    assert 'ENTRYPOINT ["gpu-mdf"]' in text and '"serve"' in text
    assert CliRunner().invoke(main, ["serve", "--help"]).exit_code == 0
