#!/opt/labkit/venv/bin/python
"""Test doubles of kubeadm, kube-apiserver, kubectl, kubelet (with kube-proxy's NodePort part)
and crictl, for labkit's kubeadm cluster on VMs that cannot download Kubernetes.

Built into the VM test box (``tests/vm/kube_box.py``), never installed into a running
guest.  They answer the commands labkit's kubeadm driver and the Vagrant provisioning
scripts run the way ``tests/kubeadm_fake.py``'s FakeCluster answers them (kubectl
1.31's words), but the work behind the answers is real where the guest can do it:

- ``kubeadm init`` signs the API server's certificate with the cluster CA the
  Vagrantfile made, starts the API server double (HTTPS, port 6443) and the kubelet;
  ``kubeadm join`` checks the CA's public key hash it was given against the API
  server's ``cluster-info`` and the bootstrap token, then writes the kubelet's
  configuration and starts it.
- the API server double keeps Services, Deployments and the nodes' reports in memory.
- the kubelet double is the systemd unit ``kubelet.service``: it validates
  ``/var/lib/kubelet/config.yaml`` at start (a bad file: it exits, healthz stops),
  serves ``http://127.0.0.1:10248/healthz``, reports its node Ready, admits each pod's
  sysctls against ``allowedUnsafeSysctls`` (rejected pods: ``SysctlForbidden``), and
  runs each admitted pod as a network namespace on the bridge ``cni0`` with the pod
  sysctls set in it and the image's entrypoint plus ``in.tftpd`` in a systemd unit
  with the pod's CPU quota (the pod image is a double: the served file is in the box
  at ``/srv/tftp``).  Pods live in their own units, so a kubelet restart keeps them.
  As kube-proxy would, it DNATs the NodePort to the ready pods (chain KUBE-DOUBLE-NODEPORTS).
- ``crictl inspect`` prints a pod's PID from the kubelet's record.

Usage: ``kube_double.py TOOL ARGS`` (``/usr/local/bin/{kubeadm,kubectl,kubelet,crictl}``
are wrappers).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import yaml

STATE = Path("/var/lib/kube-double")
PKI = Path("/etc/kubernetes/pki")
ADMIN_CONF = Path("/etc/kubernetes/admin.conf")
KUBELET_CONF = Path("/etc/kubernetes/kubelet.conf")
KUBELET_CONFIG = Path("/var/lib/kubelet/config.yaml")
TEMPLATE = Path("/usr/local/lib/labkit-double/kubelet-config.yaml")
ENTRYPOINT = "/usr/local/lib/labkit-double/entrypoint.sh"
PODS = STATE / "pods.json"
CHAIN = "KUBE-DOUBLE-NODEPORTS"
READY_WITHIN = 15.0  # s since the node's last report for it to count as Ready
SAFE_SYSCTLS = {  # the kubelet's safe set (labkit.manifests.SAFE_SYSCTLS)
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}


def die(message: str, code: int = 1) -> None:
    """Print ``message`` to stderr and exit ``code``."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.exit(code)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; with ``check`` a failure ends the program with its message."""
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


# --- kubeconfig and the API client ---------------------------------------------------------

def kubeconfig_doc(server: str, ca_pem: bytes, token: str, user: str) -> str:
    """A kubeconfig of the shape kubeadm writes (a token user instead of client certificates)."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": f"{user}@kubernetes",
        "clusters": [{"name": "kubernetes", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "contexts": [{"name": f"{user}@kubernetes", "context": {"cluster": "kubernetes", "user": user}}],
        "users": [{"name": user, "user": {"token": token}}]}, sort_keys=False)


class Client:
    """The API server double's client, from a kubeconfig (TLS checked against its CA)."""

    def __init__(self, path: Path):
        try:
            doc = yaml.safe_load(path.read_text())
            cluster = doc["clusters"][0]["cluster"]
            self.server = cluster["server"].rstrip("/")
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            self.token = doc["users"][0]["user"]["token"]
        except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise ConnectionError(f"cannot read the kubeconfig {path}: {exc}") from None
        self.context = ssl.create_default_context(cadata=ca)

    def call(self, method: str, path: str, body=None, timeout: float = 20.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ConnectionError(f"the server answered {exc.code}: {exc.read().decode(errors='replace')}") \
                from None
        except (urllib.error.URLError, OSError) as exc:
            host = self.server.split("//", 1)[-1]
            raise ConnectionError(f"The connection to the server {host} was refused - did you specify "
                                  f"the right host or port? ({exc})") from None


# --- kube-apiserver double --------------------------------------------------------------------

def apiserver(args: list[str]) -> None:
    """Serve the API over HTTPS until stopped (``apiserver STATE_JSON``)."""
    conf = json.loads(Path(args[0]).read_text())
    lock = threading.Lock()
    objects: dict[str, dict] = {"services": {}, "deployments": {}, "nodes": {}}
    tokens = {conf["admin_token"]: "admin", conf["bootstrap_token"]: "bootstrap"}
    ca_pem = (PKI / "ca.crt").read_text()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, doc) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _who(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

        def do_GET(self):
            if self.path == "/readyz":
                return self._send(200, "ok")
            if self.path == "/cluster-info":  # public, as kube-public/cluster-info is
                return self._send(200, {"ca": ca_pem})
            if not self._who():
                return self._send(401, "Unauthorized")
            if self.path == "/objects":
                with lock:
                    doc = json.loads(json.dumps(objects))
                now = time.time()
                for node in doc["nodes"].values():
                    node["ready"] = node.get("ready", False) and now - node["seen"] < READY_WITHIN
                return self._send(200, doc)
            self._send(404, "not found")

        def do_PUT(self):
            who = self._who()
            kind, _, key = self.path.strip("/").partition("/")
            if not who or kind not in objects or not key:
                return self._send(401 if not who else 404, "no")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with lock:
                old = objects[kind].get(key)
                if kind == "nodes":
                    body["seen"] = time.time()
                    verb = "updated"
                elif kind == "deployments":
                    gen = (old or {}).get("generation", 0)
                    same = old and old["doc"]["spec"] == body["spec"]
                    body = {"doc": body, "generation": gen if same else gen + 1}
                    verb = "unchanged" if same else ("configured" if old else "created")
                else:
                    verb = "unchanged" if old == body else ("configured" if old else "created")
                objects[kind][key] = body
            self._send(200, verb)

        def do_DELETE(self):
            kind, _, key = self.path.strip("/").partition("/")
            if not self._who() or kind not in objects:
                return self._send(401, "no")
            with lock:
                gone = objects[kind].pop(key, None)
            self._send(200 if gone is not None else 404, "deleted" if gone is not None else "not found")

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 6443), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(PKI / "apiserver.crt"), str(PKI / "apiserver.key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()


# --- kubeadm double ---------------------------------------------------------------------------

def _config_docs(path: str) -> dict[str, dict]:
    docs = {}
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if isinstance(doc, dict) and doc.get("kind"):
            docs[doc["kind"]] = doc
    return docs


def _spki_hash(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _sign_apiserver_cert(ip: str) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate((PKI / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((PKI / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                 "kube-apiserver")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)),
                                                        x509.DNSName("kubernetes")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (PKI / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    old = os.umask(0o077)
    try:
        (PKI / "apiserver.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    finally:
        os.umask(old)


def _kubelet_config(cgroup_driver: str = "systemd") -> str:
    doc = yaml.safe_load(TEMPLATE.read_text())
    doc["cgroupDriver"] = cgroup_driver
    return yaml.safe_dump(doc, sort_keys=True)


def _start_kubelet(kubeconfig: str, node: str) -> None:
    KUBELET_CONF.write_text(kubeconfig)
    os.chmod(KUBELET_CONF, 0o600)
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "node-name").write_text(node + "\n")
    sh("systemctl", "enable", "kubelet")
    sh("systemctl", "restart", "kubelet")


def kubeadm(args: list[str]) -> None:
    """``kubeadm init --config F`` and ``kubeadm join --config F``."""
    if len(args) < 3 or args[0] not in ("init", "join") or args[1] != "--config":
        die(f"kubeadm (labkit's test double) knows init/join --config FILE, not: {' '.join(args)}", 2)
    docs = _config_docs(args[2])
    if args[0] == "init":
        init = docs.get("InitConfiguration")
        if not init or "ClusterConfiguration" not in docs:
            die("error: the config must hold an InitConfiguration and a ClusterConfiguration")
        ip = init["localAPIEndpoint"]["advertiseAddress"]
        node = init["nodeRegistration"]["name"]
        for f in ("ca.crt", "ca.key"):
            if not (PKI / f).exists():
                die(f"[certs] error: {PKI / f} is missing (the Vagrantfile's CA)")
        print("[certs] Using the existing \"ca\" certificate and key")
        _sign_apiserver_cert(ip)
        print(f"[certs] apiserver serving cert is signed for IPs [{ip}]")
        STATE.mkdir(parents=True, exist_ok=True)
        admin_token = uuid.uuid4().hex
        conf = {"admin_token": admin_token, "bootstrap_token": init["bootstrapTokens"][0]["token"]}
        (STATE / "apiserver.json").write_text(json.dumps(conf))
        sh("systemctl", "enable", "--now", "kube-apiserver-double")
        ca = (PKI / "ca.crt").read_bytes()
        ADMIN_CONF.write_text(kubeconfig_doc(f"https://{ip}:6443", ca, admin_token, "kubernetes-admin"))
        os.chmod(ADMIN_CONF, 0o600)
        client = Client(ADMIN_CONF)
        for _ in range(120):
            try:
                client.call("GET", "/objects", timeout=5)
                break
            except ConnectionError:
                time.sleep(1)
        else:
            die("[wait-control-plane] the API server did not answer within 120 s")
        KUBELET_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        KUBELET_CONFIG.write_text(_kubelet_config(docs.get("KubeletConfiguration", {}).get("cgroupDriver", "systemd")))
        _start_kubelet(kubeconfig_doc(f"https://{ip}:6443", ca, conf["bootstrap_token"], f"system:node:{node}"), node)
        print("Your Kubernetes control-plane has initialized successfully!")
        return
    join = docs.get("JoinConfiguration")
    if not join:
        die("error: the config must hold a JoinConfiguration")
    disc = join["discovery"]["bootstrapToken"]
    endpoint, token, pins = disc["apiServerEndpoint"], disc["token"], disc.get("caCertHashes") or []
    node = join["nodeRegistration"]["name"]
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://{endpoint}/cluster-info", context=unverified, timeout=20) as r:
            ca = json.loads(r.read())["ca"].encode()
    except (OSError, ValueError, KeyError) as exc:
        die(f"error execution phase preflight: couldn't validate the identity of the API Server: {exc}")
    found = _spki_hash(ca)
    if found not in pins:
        die(f'error execution phase preflight: cluster CA found in cluster-info ConfigMap is invalid: '
            f'none of the public keys "{found}" are pinned')
    print(f"[discovery] Cluster info signature and contents are valid (CA {found})")
    conf = kubeconfig_doc(f"https://{endpoint}", ca, token, f"system:node:{node}")
    PKI.mkdir(parents=True, exist_ok=True)
    (PKI / "ca.crt").write_bytes(ca)
    tmp = STATE / "join.conf"
    STATE.mkdir(parents=True, exist_ok=True)
    tmp.write_text(conf)
    try:
        Client(tmp).call("GET", "/objects")
    except ConnectionError as exc:
        die(f"error execution phase kubelet-start: the bootstrap token was refused: {exc}")
    finally:
        tmp.unlink(missing_ok=True)
    KUBELET_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    KUBELET_CONFIG.write_text(_kubelet_config())
    _start_kubelet(conf, node)
    print("This node has joined the cluster")


# --- kubectl double ---------------------------------------------------------------------------

def _parse(args: list[str]) -> tuple[list[str], dict[str, str]]:
    with_value = {"-n": "namespace", "--namespace": "namespace", "-o": "output", "--output": "output",
                  "-l": "selector", "--selector": "selector", "-f": "filename", "--filename": "filename",
                  "-p": "patch", "--patch": "patch"}
    pos, opts = [], {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in with_value:
            opts[with_value[a]] = args[i + 1]
            i += 2
            continue
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            opts[k] = v
        elif a.startswith("--"):
            opts[a[2:]] = "true"
        else:
            pos.append(a)
        i += 1
    return pos, opts


def _seconds(text: str | None, default: float) -> float:
    if not text:
        return default
    m = re.fullmatch(r"(\d+)(s|m)?", text)
    if not m:
        die(f'error: invalid argument "{text}" for "--timeout" flag', 1)
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def _json_patch(doc: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = op["value"]
    elif op["op"] == "replace" and last not in node:
        raise KeyError(f"replace operation does not apply: doc is missing path: {op['path']}")
    elif op["op"] in ("add", "replace"):
        node[last] = op["value"]
    elif op["op"] == "remove":
        node.pop(last)


def _template_hash(dep: dict) -> str:
    return hashlib.sha1(json.dumps(dep["spec"]["template"], sort_keys=True).encode()).hexdigest()[:10]


def _pods_of(objects: dict, ns: str, selector: dict[str, str]) -> list[dict]:
    pods = []
    for node in objects["nodes"].values():
        for pod in node.get("pods", []):
            if pod["namespace"] == ns and all(pod["labels"].get(k) == v for k, v in selector.items()):
                pods.append(pod)
    return sorted(pods, key=lambda p: p["name"])


def _pod_json(pod: dict, node: str) -> dict:
    if pod["phase"] == "Failed":
        status = {"phase": "Failed", "reason": pod["reason"], "message": pod["message"]}
    else:
        running = pod["phase"] == "Running"
        status = {"phase": pod["phase"], "podIP": pod["ip"], "containerStatuses": [{
            "name": pod["container"], "ready": pod["ready"], "restartCount": 0,
            "containerID": f"containerd://{pod['cid']}", "image": pod["image"],
            "state": {"running": {"startedAt": pod["started"]}} if running
            else {"waiting": {"reason": "ContainerCreating"}}}]}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod["name"], "namespace": pod["namespace"], "labels": pod["labels"]},
            "spec": {"nodeName": node}, "status": status}


def kubectl(args: list[str]) -> None:
    """The kubectl commands labkit's driver and the provisioning scripts run."""
    pos, opts = _parse(args)
    path = Path(os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")
    try:
        client = Client(path)
    except ConnectionError:
        die("The connection to the server localhost:8080 was refused - did you specify the right host or port?")
    ns = opts.get("namespace", "default")
    try:
        _kubectl(client, pos, opts, ns)
    except ConnectionError as exc:
        die(str(exc))


def _kubectl(client: Client, pos: list[str], opts: dict[str, str], ns: str) -> None:
    verb = pos[0] if pos else ""
    if verb == "apply" and "filename" in opts:
        text = sys.stdin.read() if opts["filename"] == "-" else Path(opts["filename"]).read_text()
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            kind, name = doc["kind"], doc["metadata"]["name"]
            dns = doc["metadata"].get("namespace", ns)
            if kind not in ("Service", "Deployment"):
                die(f'error: resource mapping not found for kind "{kind}" (labkit\'s test double)')
            said = client.call("PUT", f"/{kind.lower()}s/{dns}/{name}", doc)
            print(f"{'service' if kind == 'Service' else 'deployment.apps'}/{name} {said}")
        return
    objects = client.call("GET", "/objects")
    if verb == "get" and pos[1:2] == ["deployment"]:
        if f"{ns}/{pos[2]}" not in objects["deployments"]:
            die(f'Error from server (NotFound): deployments.apps "{pos[2]}" not found')
        print(f"deployment.apps/{pos[2]}")
        return
    if verb in ("patch", "scale") and pos[1:2] == ["deployment"]:
        key = f"{ns}/{pos[2]}"
        if key not in objects["deployments"]:
            die(f'Error from server (NotFound): deployments.apps "{pos[2]}" not found')
        doc = objects["deployments"][key]["doc"]
        if verb == "patch":
            if opts.get("type") != "json":
                die("error: labkit's test double patches with --type=json only")
            try:
                for op in json.loads(opts["patch"]):
                    _json_patch(doc, op)
            except (KeyError, IndexError, ValueError) as exc:
                die(f"The request is invalid: {exc}")
        else:
            doc["spec"]["replicas"] = int(opts["replicas"])
        client.call("PUT", f"/deployments/{key}", doc)
        print(f"deployment.apps/{pos[2]} {'patched' if verb == 'patch' else 'scaled'}")
        return
    if verb == "rollout" and pos[1:2] == ["status"]:
        return _rollout(client, pos[2].split("/", 1)[1], ns, _seconds(opts.get("timeout"), 600))
    if verb == "get" and pos[1:2] == ["pods"] and opts.get("output") == "json":
        selector = dict(kv.split("=", 1) for kv in opts.get("selector", "").split(",") if kv)
        items = [_pod_json(p, p["node"]) for p in _pods_of(objects, ns, selector)]
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}, indent=4))
        return
    if verb == "get" and pos[1:2] == ["node"]:
        node = objects["nodes"].get(pos[2])
        if node is None:
            die(f'Error from server (NotFound): nodes "{pos[2]}" not found')
        if opts.get("output") != 'jsonpath={.status.conditions[?(@.type=="Ready")].status}':
            die(f"error: labkit's test double prints a node's Ready status only, not -o {opts.get('output')}")
        sys.stdout.write("True" if node["ready"] else "False")
        return
    if verb == "wait" and opts.get("for") == "condition=Ready" and pos[1:2] and pos[1].startswith("node/"):
        name, deadline = pos[1][5:], time.time() + _seconds(opts.get("timeout"), 30)
        while not (client.call("GET", "/objects")["nodes"].get(name) or {}).get("ready"):
            if time.time() > deadline:
                die("error: timed out waiting for the condition on nodes/" + name)
            time.sleep(2)
        print(f"node/{name} condition met")
        return
    if verb == "delete" and pos[1:2] in (["deployment"], ["service"]):
        kind = pos[1] + "s"
        key = f"{ns}/{pos[2]}"
        if key not in objects[kind]:
            if opts.get("ignore-not-found") == "true":
                return
            die(f'Error from server (NotFound): {pos[1]} "{pos[2]}" not found')
        selector = objects[kind][key]["doc"]["spec"]["selector"]["matchLabels"] if kind == "deployments" else {}
        client.call("DELETE", f"/{kind}/{key}")
        print(f'{"deployment.apps" if kind == "deployments" else "service"} "{pos[2]}" deleted')
        if kind == "deployments" and opts.get("wait", "true") == "true":
            deadline = time.time() + 120
            while _pods_of(client.call("GET", "/objects"), ns, selector) and time.time() < deadline:
                time.sleep(2)
        return
    die(f"kubectl (labkit's test double): unsupported command: {' '.join(sys.argv[2:])}", 2)


def _rollout(client: Client, name: str, ns: str, timeout: float) -> None:
    deadline = time.time() + timeout
    said = False
    while True:
        objects = client.call("GET", "/objects")
        entry = objects["deployments"].get(f"{ns}/{name}")
        if entry is None:
            die(f'Error from server (NotFound): deployments.apps "{name}" not found')
        doc = entry["doc"]
        want, h = doc["spec"]["replicas"], _template_hash(doc)
        pods = _pods_of(objects, ns, doc["spec"]["selector"]["matchLabels"])
        new_ready = [p for p in pods if p["hash"] == h and p["ready"]]
        old = [p for p in pods if p["hash"] != h]
        if len(new_ready) == want and len(pods) == want and not old:
            print(f'deployment "{name}" successfully rolled out')
            return
        if not said:
            print(f'Waiting for deployment "{name}" rollout to finish: {len(new_ready)} of {want} '
                  "updated replicas are available...", flush=True)
            said = True
        if time.time() > deadline:
            die("error: timed out waiting for the condition")
        time.sleep(2)


# --- kubelet double (and kube-proxy's NodePort rules) -----------------------------------------

def _validate_config(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        die(f'E run.go:72] "command failed" err="failed to load kubelet config file, path: {path}: {exc}"')
    if not isinstance(doc, dict) or doc.get("kind") != "KubeletConfiguration" \
            or doc.get("apiVersion") != "kubelet.config.k8s.io/v1beta1":
        die(f'E run.go:72] "command failed" err="failed to load kubelet config file, path: {path}, '
            'error: no kind \\"KubeletConfiguration\\" of version kubelet.config.k8s.io/v1beta1"')
    for p in doc.get("allowedUnsafeSysctls") or []:
        if not isinstance(p, str) or not re.fullmatch(r"[a-z0-9_.]+\*?", p):
            die(f'E run.go:72] "command failed" err="failed to validate kubelet configuration, error: '
                f'invalid configuration: allowedUnsafeSysctls entry {p!r}"')
    return doc


def _load_pods() -> list[dict]:
    try:
        return json.loads(PODS.read_text())
    except FileNotFoundError:
        return []


def _save_pods(pods: list[dict]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    tmp = PODS.with_suffix(".tmp")
    tmp.write_text(json.dumps(pods, indent=1))
    os.replace(tmp, PODS)


class Kubelet:
    """One node's pods, reconciled with the API server's Deployments every second."""

    def __init__(self, node: str, config: dict, client: Client):
        self.node = node
        self.allowed = list(config.get("allowedUnsafeSysctls") or [])
        self.client = client
        index = 0 if "control" in node else int(re.sub(r"\D", "", node) or 1)
        self.prefix = f"10.244.{index}"
        self.rules: list[list[str]] | None = None

    def _forbidden(self, sysctls: dict[str, str]) -> str | None:
        for name in sysctls:
            if name in SAFE_SYSCTLS:
                continue
            if not any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in self.allowed):
                return name
        return None

    def _bridge(self) -> None:
        if sh("ip", "link", "show", "cni0", check=False).returncode != 0:
            sh("ip", "link", "add", "cni0", "type", "bridge")
            sh("ip", "addr", "add", f"{self.prefix}.1/24", "dev", "cni0")
            sh("ip", "link", "set", "cni0", "up")

    def start_pod(self, dep: dict, h: str, pods: list[dict]) -> dict:
        meta, tmpl = dep["metadata"], dep["spec"]["template"]
        container = tmpl["spec"]["containers"][0]
        sysctls = {s["name"]: str(s["value"]) for s in (tmpl["spec"].get("securityContext") or {}).get("sysctls") or []}
        name = f"{meta['name']}-{h}-{uuid.uuid4().hex[:5]}"
        pod = {"name": name, "namespace": meta.get("namespace", "default"), "labels": tmpl["metadata"]["labels"],
               "hash": h, "node": self.node, "container": container["name"], "image": container["image"],
               "cid": hashlib.sha256((name + uuid.uuid4().hex).encode()).hexdigest(), "pid": 0, "ip": None,
               "phase": "Pending", "ready": False, "reason": None, "message": "",
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        bad = self._forbidden(sysctls)
        if bad:  # the kubelet's admission: the pod is rejected, nothing runs
            pod.update(phase="Failed", reason="SysctlForbidden",
                       message=f'Pod forbidden sysctl: "{bad}" not allowlisted')
            return pod
        try:
            return self._run_pod(pod, container, sysctls, pods)
        except (RuntimeError, StopIteration) as exc:  # as the kubelet reports a sandbox it could not make
            self.stop_pod(pod)
            pod.update(phase="Failed", reason="CreatePodSandboxError", message=str(exc), unit=None)
            return pod

    def _run_pod(self, pod: dict, container: dict, sysctls: dict[str, str], pods: list[dict]) -> dict:
        self._bridge()
        used = {p["ip"] for p in pods if p.get("ip")}
        ip = next(f"{self.prefix}.{i}" for i in range(2, 255) if f"{self.prefix}.{i}" not in used)
        tag = pod["cid"][:8]
        pod.update(ip=ip, netns=f"cni-{tag}", veth=f"veth{tag}", unit=f"kube-pod-{tag}")
        sh("ip", "netns", "add", pod["netns"])
        sh("ip", "link", "add", pod["veth"], "type", "veth", "peer", "name", "eth0", "netns", pod["netns"])
        sh("ip", "link", "set", pod["veth"], "master", "cni0", "up")
        inside = ["ip", "netns", "exec", pod["netns"]]
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        sh(*inside, "ip", "route", "add", "default", "via", f"{self.prefix}.1")
        for k, v in sysctls.items():
            sh(*inside, "sysctl", "-w", f"{k}={v}")
        argv = ["systemd-run", f"--unit={pod['unit']}", "--collect", "--quiet"]
        cpu = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
        if cpu:
            cores = float(cpu[:-1]) / 1000 if str(cpu).endswith("m") else float(cpu)
            argv.append(f"--property=CPUQuota={round(cores * 100)}%")
        for env in container.get("env") or []:
            argv.append(f"--setenv={env['name']}={env['value']}")
        sh(*argv, *inside, ENTRYPOINT, *(container.get("command") or []), *(container.get("args") or []))
        return pod

    def stop_pod(self, pod: dict) -> None:
        if pod.get("unit"):
            sh("systemctl", "stop", pod["unit"], check=False)
        if pod.get("netns"):
            sh("ip", "netns", "del", pod["netns"], check=False)
        if pod.get("veth"):
            sh("ip", "link", "del", pod["veth"], check=False)

    def refresh(self, pod: dict) -> None:
        if pod["phase"] == "Failed" or not pod.get("unit"):
            return
        pid = sh("systemctl", "show", "-p", "MainPID", "--value", pod["unit"], check=False).stdout.strip()
        comm = ""
        if pid.isdigit() and pid != "0":
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                pass
        pod["pid"] = int(pid) if pid.isdigit() else 0
        pod["ready"] = comm == "in.tftpd"
        pod["phase"] = "Running" if pod["ready"] else ("Pending" if pod["phase"] == "Pending" else "Failed")
        if pod["phase"] == "Failed":
            pod.update(reason="Error", message=f"the container's process ended (unit {pod['unit']})")

    def sync(self) -> None:
        objects = self.client.call("GET", "/objects")
        pods = _load_pods()
        keep = []
        for key, entry in objects["deployments"].items():
            dep = entry["doc"]
            selector = (dep["spec"]["template"]["spec"].get("nodeSelector") or {}).get("kubernetes.io/hostname")
            if selector != self.node:
                continue
            h = _template_hash(dep)
            mine = [p for p in pods if p["hash"] == h and f"{p['namespace']}/{p['name'].rsplit('-', 2)[0]}" == key]
            mine = mine[:dep["spec"]["replicas"]]
            while len(mine) < dep["spec"]["replicas"]:
                mine.append(self.start_pod(dep, h, pods + mine))
            keep += mine
        for pod in pods:
            if pod not in keep:
                self.stop_pod(pod)
        for pod in keep:
            self.refresh(pod)
        _save_pods(keep)
        self.proxy(objects, keep)
        self.client.call("PUT", f"/nodes/{self.node}", {"ready": True, "pods": keep})

    def proxy(self, objects: dict, pods: list[dict]) -> None:
        """kube-proxy's part: each NodePort DNAT'ed to the ready pods its selector picks."""
        rules = []
        for svc in objects["services"].values():
            selector = svc["spec"].get("selector") or {}
            ready = [p for p in pods if p["ready"] and all(p["labels"].get(k) == v for k, v in selector.items())]
            for port in svc["spec"].get("ports", []):
                if "nodePort" not in port:
                    continue
                for i, p in enumerate(ready):
                    rule = ["-p", port.get("protocol", "TCP").lower(), "--dport", str(port["nodePort"])]
                    if len(ready) - i > 1:
                        rule += ["-m", "statistic", "--mode", "random", "--probability", f"{1 / (len(ready) - i):.5f}"]
                    rules.append(rule + ["-j", "DNAT", "--to-destination", f"{p['ip']}:{port.get('targetPort', port['port'])}"])
        if rules == self.rules:
            return
        if sh("iptables", "-t", "nat", "-L", CHAIN, "-n", check=False).returncode != 0:
            sh("iptables", "-t", "nat", "-N", CHAIN)
        if sh("iptables", "-t", "nat", "-C", "PREROUTING", "-j", CHAIN, check=False).returncode != 0:
            sh("iptables", "-t", "nat", "-A", "PREROUTING", "-j", CHAIN)
        sh("iptables", "-t", "nat", "-F", CHAIN)
        for rule in rules:
            sh("iptables", "-t", "nat", "-A", CHAIN, *rule)
        self.rules = rules


def kubelet(args: list[str]) -> None:
    """The kubelet: ``kubelet --config=F --kubeconfig=F [--node-ip=IP]`` (a systemd unit)."""
    _, opts = _parse(args)
    config = _validate_config(Path(opts.get("config", str(KUBELET_CONFIG))))
    conf = Path(opts.get("kubeconfig", str(KUBELET_CONF)))
    if not conf.exists():
        die(f'E run.go:72] "command failed" err="failed to run Kubelet: {conf} does not exist"')
    node = (STATE / "node-name").read_text().strip() if (STATE / "node-name").exists() else socket.gethostname()
    worker = Kubelet(node, config, Client(conf))

    class Health(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

    port = int(config.get("healthzPort", 10248))
    health = http.server.ThreadingHTTPServer((config.get("healthzBindAddress", "127.0.0.1"), port), Health)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    first = True
    while True:
        try:
            worker.sync()
            if first:  # healthy once it synced with the API server
                threading.Thread(target=health.serve_forever, daemon=True).start()
                first = False
        except Exception as exc:  # the kubelet retries its sync loop; the journal shows why
            sys.stderr.write(f"E kubelet.go] sync failed: {type(exc).__name__}: {exc}\n")
        time.sleep(1)


# --- crictl double ----------------------------------------------------------------------------

def crictl(args: list[str]) -> None:
    """``crictl inspect --output go-template --template {{.info.pid}} CID``."""
    pos, opts = _parse(args)
    if pos[:1] != ["inspect"] or opts.get("template") is None and "--template" not in args:
        die(f"crictl (labkit's test double) knows inspect --output go-template --template "
            f"{{{{.info.pid}}}} ID only, not: {' '.join(args)}", 2)
    template = args[args.index("--template") + 1]
    if template != "{{.info.pid}}":
        die(f"crictl (labkit's test double): unsupported template {template}", 2)
    cid = pos[-1]
    for pod in _load_pods():
        if pod["cid"] == cid or pod["cid"].startswith(cid):
            print(pod["pid"])
            return
    die(f'E inspect: get container status: rpc error: code = NotFound desc = an error occurred when try to '
        f'find container "{cid}": not found')


TOOLS = {"kubeadm": kubeadm, "kubectl": kubectl, "kubelet": kubelet, "crictl": crictl, "apiserver": apiserver}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        die(f"usage: kube_double.py {{{','.join(TOOLS)}}} ARGS", 2)
    TOOLS[sys.argv[1]](sys.argv[2:])
