"""What the Kubernetes schemas cannot check, and a static reading of the
Dockerfile (no container engine runs here), for tests/packaging/manifests.sh.

Usage: manifests.py REPO_ROOT AGENTD_BINARY. Prints one line per check and
`checks: N, failed: M` last; exits 1 when a check failed.

Not here: building or running the image (needs an engine), scheduling the
StatefulSet (needs a cluster).
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(sys.argv[1])
AGENTD = sys.argv[2]
DOCKERFILE = ROOT / "packaging/container/Dockerfile"
MANIFEST = ROOT / "packaging/k8s/agentd.yaml"
# agentd's default drain on SIGTERM (AGENTD_DRAIN_TIMEOUT), in seconds.
DEFAULT_DRAIN_SECONDS = 20
# agentd's health-loop interval without systemd's watchdog, in seconds.
HEALTH_INTERVAL_SECONDS = 10

checks = 0
failures = []


def check(what, condition, detail=""):
    global checks
    checks += 1
    if condition:
        print(f"  ok    {what}")
    else:
        failures.append(what)
        print(f"  FAIL  {what}" + (f": {detail}" if detail else ""))


def seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    value = float(m.group(1))
    return {"ms": value / 1000, "m": value * 60}.get(m.group(2), value)


def help_text(*args):
    return subprocess.run([AGENTD, *args, "--help"], capture_output=True, text=True, check=True).stdout


def commands():
    """Subcommands listed by `agentd --help`."""
    out, on = [], False
    for line in help_text().splitlines():
        if line.startswith("Commands:"):
            on = True
        elif on and not line.strip():
            break
        elif on:
            out.append(line.split()[0])
    return out


# ------------------------------------------------------------ the Dockerfile

def parse_dockerfile(path):
    """[(INSTRUCTION, argument text)], continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a continued line")
    return instructions


def env_pairs(text):
    """ENV k=v k2=v2 (quoted values allowed)."""
    return dict(part.split("=", 1) for part in shlex.split(text))


ins = parse_dockerfile(DOCKERFILE)
known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
         "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
check("Dockerfile: every instruction is a Dockerfile instruction",
      all(i in known for i, _ in ins), [i for i, _ in ins if i not in known])

stages = []  # [{"name", "image", "ins": [...]}]
for i, arg in ins:
    if i == "FROM":
        m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arg, re.I)
        stages.append({"image": m.group(1), "name": m.group(2), "ins": []})
    else:
        stages[-1]["ins"].append((i, arg))
build, runtime = stages[0], stages[-1]
check("Dockerfile: multi-stage (a build stage and a runtime stage)", len(stages) >= 2)
rust_version = re.search(r'^rust-version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
check(f"Dockerfile: the build image is Rust {rust_version} (Cargo.toml rust-version)",
      re.fullmatch(rf"rust:{re.escape(rust_version)}(-[a-z-]+)?", build["image"]) is not None, build["image"])
check("Dockerfile: the runtime image has no Rust toolchain", not runtime["image"].startswith("rust"))

build_runs = " ".join(a for i, a in build["ins"] if i == "RUN")
check("Dockerfile: release build, locked, default features (no fault-injection)",
      "cargo build --locked --release" in build_runs and "fault-injection" not in build_runs)
build_workdir = [a for i, a in build["ins"] if i == "WORKDIR"][-1]

ignored = {l.strip() for l in (ROOT / "packaging/container/Dockerfile.dockerignore").read_text().splitlines()
           if l.strip() and not l.startswith("#")}
copies = [(i, a) for s in stages for i, a in s["ins"] if i == "COPY"]
binary_dest = None
for _, arg in copies:
    words = arg.split()
    flags = [w for w in words if w.startswith("--")]
    *sources, dest = [w for w in words if not w.startswith("--")]
    from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    if from_stage:
        check(f"Dockerfile: COPY --from={from_stage} names an earlier stage",
              from_stage in [s["name"] for s in stages[:-1]])
        if sources == [f"{build_workdir}/target/release/agentd"]:
            binary_dest = dest
    else:
        for src in sources:
            check(f"Dockerfile: COPY source {src} exists in the build context and is not ignored",
                  (ROOT / src).exists() and src.rstrip("/").split("/")[0] not in ignored)
check("Dockerfile: the release binary is copied from the build stage's target/release", binary_dest is not None)

runtime_runs = " ".join(a for i, a in runtime["ins"] if i == "RUN")
entrypoint = json.loads(next(a for i, a in runtime["ins"] if i == "ENTRYPOINT"))
check("Dockerfile: tini is PID 1 and is installed (Debian's tini: /usr/bin/tini)",
      entrypoint[:2] == ["/usr/bin/tini", "--"] and re.search(r"apt-get install [^&]*\btini\b", runtime_runs))
check(f"Dockerfile: ENTRYPOINT runs the copied binary ({binary_dest})", entrypoint[2:] == [binary_dest])
cmd = json.loads(next(a for i, a in runtime["ins"] if i == "CMD"))
check(f"Dockerfile: CMD {cmd} is an agentd subcommand", cmd[0] in commands(), commands())

user = next(a for i, a in runtime["ins"] if i == "USER")
uid = user.split(":")[0]
check(f"Dockerfile: runs as a non-root numeric user ({user})", uid.isdigit() and int(uid) != 0)
check(f"Dockerfile: user {uid} is created in the image", f"--uid {uid}" in runtime_runs)

env = {}
for i, a in runtime["ins"]:
    if i == "ENV":
        env.update(env_pairs(a))
# The config room declares every setting (src/config/settings.rs, the list).
config_src = "".join(p.read_text() for p in [ROOT / "src/config.rs", *sorted((ROOT / "src/config").glob("*.rs"))])
for name in env:
    if name.startswith("AGENTD_"):
        check(f"Dockerfile: ENV {name} is a setting agentd reads", f'"{name}"' in config_src)
state_dir = env["AGENTD_STATE_DIR"]
listen_port = int(env["AGENTD_LISTEN"].rsplit(":", 1)[1])
volume = json.loads(next(a for i, a in runtime["ins"] if i == "VOLUME"))
check(f"Dockerfile: the state dir {state_dir} is a VOLUME", volume == [state_dir])
check(f"Dockerfile: the state dir is owned by user {uid}",
      re.search(rf"install -d -o \S+ -g \S+ -m 0700 {re.escape(state_dir)}", runtime_runs) is not None)
expose = [int(a.split("/")[0]) for i, a in runtime["ins"] if i == "EXPOSE"]
check(f"Dockerfile: EXPOSE {expose} is the listen port {listen_port}", expose == [listen_port])
check("Dockerfile: listens on all addresses (reachable from outside the container)",
      env["AGENTD_LISTEN"].startswith("0.0.0.0:"))

health = next(a for i, a in runtime["ins"] if i == "HEALTHCHECK")
health_cmd = json.loads(health.split(" CMD ", 1)[1])
check("Dockerfile: HEALTHCHECK runs `agentd health`", health_cmd[:2] == [binary_dest, "health"], health_cmd)
health_help = help_text("health")
for flag in [w for w in health_cmd if w.startswith("--")]:
    check(f"Dockerfile: HEALTHCHECK flag {flag} is listed by `agentd health --help`", flag in health_help)
check("Dockerfile: HEALTHCHECK asks the container's own listener",
      f"127.0.0.1:{listen_port}" in health_cmd or f"http://127.0.0.1:{listen_port}" in " ".join(health_cmd))

# ------------------------------------------------------------ the manifests

docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
by_kind = {d["kind"]: d for d in docs}
sts, svc = by_kind["StatefulSet"], by_kind["Service"]
spec = sts["spec"]
pod = spec["template"]["spec"]
(container,) = pod["containers"]
cenv = {e["name"]: e for e in container["env"]}

check("StatefulSet: replicas 1 (SQLite: one writer per volume)", spec["replicas"] == 1)
claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
state_claim = next((n for n, p in mounts.items() if p == cenv["AGENTD_STATE_DIR"]["value"]), None)
check("StatefulSet: the state dir is mounted from a PersistentVolumeClaim", state_claim in claims)
check("StatefulSet: the claim is ReadWriteOnce", claims.get(state_claim, {}).get("spec", {}).get("accessModes") == ["ReadWriteOnce"])
check("StatefulSet and Dockerfile: the same state dir", cenv["AGENTD_STATE_DIR"]["value"] == state_dir)
check("StatefulSet and Dockerfile: the same listen address",
      cenv["AGENTD_LISTEN"]["value"] == env["AGENTD_LISTEN"])
check("StatefulSet: the token comes from a Secret (required off loopback)",
      "secretKeyRef" in cenv.get("AGENTD_API_TOKEN", {}).get("valueFrom", {}))
for name in cenv:
    check(f"StatefulSet: env {name} is a setting agentd reads", f'"{name}"' in config_src)

ports = {p["name"]: p["containerPort"] for p in container["ports"]}
for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
    p = container.get(probe, {}).get("httpGet", {})
    port = ports.get(p.get("port"), p.get("port"))
    check(f"StatefulSet: {probe} GETs /health on port {listen_port}", p.get("path") == "/health" and port == listen_port, p)
live = container["livenessProbe"]
check("StatefulSet: liveness tolerates one failed health tick (>= 2 intervals before a restart)",
      live["periodSeconds"] * live["failureThreshold"] >= 2 * HEALTH_INTERVAL_SECONDS)
drain = seconds(cenv["AGENTD_DRAIN_TIMEOUT"]["value"]) if "AGENTD_DRAIN_TIMEOUT" in cenv else DEFAULT_DRAIN_SECONDS
check(f"StatefulSet: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} > drain {drain:g}s",
      pod["terminationGracePeriodSeconds"] > drain)
res = container["resources"]
check("StatefulSet: cpu and memory requests and limits",
      all(k in res.get(w, {}) for w in ["requests", "limits"] for k in ["cpu", "memory"]))

psc, csc = pod["securityContext"], container["securityContext"]
check(f"StatefulSet: runs as the image's user {uid}", psc.get("runAsUser") == int(uid) and psc.get("runAsNonRoot") is True)
check("StatefulSet: the volume is group-writable for that user (fsGroup)", psc.get("fsGroup") == int(user.split(":")[1]))
check("StatefulSet: seccomp RuntimeDefault", psc.get("seccompProfile", {}).get("type") == "RuntimeDefault")
check("StatefulSet: no privilege escalation, read-only root, all capabilities dropped",
      csc.get("allowPrivilegeEscalation") is False and csc.get("readOnlyRootFilesystem") is True
      and csc.get("capabilities", {}).get("drop") == ["ALL"] and not csc.get("privileged"))
check("StatefulSet: no service-account token mounted", pod.get("automountServiceAccountToken") is False)
check("StatefulSet: container args are an agentd subcommand", container["args"][0] in commands())

labels = spec["template"]["metadata"]["labels"]
check("Service: selects the StatefulSet's pods",
      all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()) and spec["selector"]["matchLabels"] == svc["spec"]["selector"])
check("Service: targets the container's http port", svc["spec"]["ports"][0]["targetPort"] in ports)
check("StatefulSet: serviceName is the Service", spec["serviceName"] == svc["metadata"]["name"])

print(f"checks: {checks}, failed: {len(failures)}")
sys.exit(1 if failures else 0)
