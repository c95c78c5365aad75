"""Security properties, each checked against the real code:
(a) no request reaches pickle, eval/exec/compile of request data, a URL fetch, a subprocess or a file it names:
    the service runs in-process (RewardService.to_asgi() behind starlette's TestClient) under a sys.addaudithook,
    and every endpoint gets hostile requests;
(b) bearer-token auth covers every route but the health probes, enumerated from the app and its OpenAPI schema so
    that a new route is covered without editing this file, and the token is compared in constant time;
(c) model files load only as ONNX, safetensors or weights_only checkpoints: an `ast` scan of the sources, and a
    model directory holding only pytorch_model.bin is refused.

The audited run happens in a child process (this file run as a script): an audit hook cannot be removed, and must
not stay in the pytest process, slowing and watching every later test; the child also imports service.app with
its own token, whatever other test modules imported before."""

from __future__ import annotations

import ast
import atexit
import base64
import fnmatch
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "security-token-0123456789"
CANARY = "rscanary7f3"  # in every string a hostile request carries, so compile/exec/open of request data shows
CANARY_EVENT = "rewardscope.canary.unpickled"
PROBES = frozenset({"/livez", "/readyz", "/healthz"})
PROMPT = f"two dogs __import__('os').system('{CANARY}') {{{{7*7}}}} ${{jndi:ldap://127.0.0.1:9/{CANARY}}}"


class Unpickled:
    """Pickles to a call of sys.audit(CANARY_EVENT): harmless, and impossible to miss if anything unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.audit, (CANARY_EVENT,))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pickled_npy() -> bytes:
    """A .npy object array (allow_pickle content) whose element unpickles to the canary call."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.array([Unpickled(), "x"], dtype=object), allow_pickle=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# The child process: run the service in-process under an audit hook, send the requests, write a JSON report.

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
ALWAYS_FORBIDDEN = {
    "pickle.find_class",
    CANARY_EVENT,
    "urllib.Request",
    "http.client.connect",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "pty.spawn",
}


def _code_mentions(code: Any, needle: str) -> bool:
    for constant in getattr(code, "co_consts", ()):
        if (isinstance(constant, str) and needle in constant) or (
            hasattr(constant, "co_consts") and _code_mentions(constant, needle)
        ):
            return True
    return False


def _called_from(function: str, module_suffix: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_code.co_filename.endswith(module_suffix):
            return True
        frame = frame.f_back
    return False


def _from_import_machinery() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class AuditRecorder:
    """Records forbidden audit events while `recording` is set.

    The filter, event by event (library internals raise the same events for their own work):
    - pickle.find_class, the canary event, urllib/http.client requests, subprocess/os.system/exec/spawn: always
      forbidden. Nothing on a request path may unpickle, fetch a URL or start a process, legitimately or not.
    - compile: forbidden when the source contains the canary, i.e. when it is request data. Libraries compile their
      own strings at run time (typing forward references, cattrs' generated converters, dataclasses), never ours.
      One exemption: ast.parse under ast.literal_eval, which numpy uses on a .npy header; it builds a syntax tree
      and accepts literals only, so nothing in the text runs.
    - exec: forbidden when the code object carries the canary (exec of module code during lazy imports is not).
    - marshal.loads: forbidden outside the import machinery (which unmarshals .pyc files).
    - socket.connect / socket.getaddrinfo: forbidden, all of them. In-process behind TestClient the service opens
      no socket to answer a request, so any connection (loopback too: SSRF's favourite target) came from request
      data such as an image URL.
    - open: forbidden for a path that a request named (/etc/passwd, a real image path) or that carries the canary.
    """

    def __init__(self, named_paths: set[str]) -> None:
        self.named_paths = named_paths
        self.recording = False
        self.events: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.recording:
            return
        try:
            reason = self._forbidden(event, args)
        except Exception as exc:  # noqa: BLE001  a hook must never raise into the service
            reason = f"audit hook failed on {event}: {exc!r}"
        if reason:
            self.events.append(f"{event}: {reason}")

    def _forbidden(self, event: str, args: tuple[Any, ...]) -> str | None:
        if event in ALWAYS_FORBIDDEN:
            return repr(args)[:300]
        if event == "compile":
            source = args[0]
            text = ast.dump(source) if isinstance(source, ast.AST) else source
            text = text.decode("utf-8", "replace") if isinstance(text, (bytes, bytearray)) else str(text)
            if CANARY in text and not _called_from("literal_eval", "ast.py"):
                return f"request data compiled: {text[:200]!r}"
        elif event == "exec":
            if _code_mentions(args[0], CANARY):
                return f"request data executed: {args[0]!r}"
        elif event == "marshal.loads":
            if not _from_import_machinery():
                return "unmarshalled outside an import"
        elif event in ("socket.connect", "socket.getaddrinfo"):
            return repr(args[1:] if event == "socket.connect" else args)[:200]
        elif event == "open":
            path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            if path in self.named_paths or CANARY in path:
                return f"opened {path}"
        return None


def base64_valid_image_path(directory: Path, data: bytes) -> Path:
    """A real image file whose path is also valid base64 (letters, digits and '/', length a multiple of 4): if
    anything treated an `image` string as a path instead of base64, this is the file it would open."""
    stem = f"{directory}/bus"
    path = Path(stem + "x" * (-len(stem) % 4))
    path.write_bytes(data)
    return path


def route_inventory(app: Any) -> dict[str, set[str]]:
    """Every path the ASGI app answers -> its methods, walking Mounts (BentoML mounts our Starlette routes with
    one, and its static files with another)."""
    inventory: dict[str, set[str]] = {}

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            path = prefix + getattr(route, "path", "")
            inner = getattr(route, "routes", None)
            if inner:  # a Mount over an app with routes
                walk(inner, path)
            elif hasattr(route, "app") and not hasattr(route, "methods"):  # a Mount over a plain ASGI app
                inventory.setdefault(f"{path}/{CANARY}.txt", set()).update({"GET", "POST"})
            else:
                inventory.setdefault(path or "/", set()).update(route.methods or {"GET"})

    walk(app.routes, "")
    return inventory


def child(report_path: str) -> None:
    """Entry point of the audited child process."""
    os.environ["REWARDSCOPE_TOKEN"] = TOKEN
    os.environ["BENTOML_HOME"] = home = tempfile.mkdtemp(prefix="bentoml-home-")
    atexit.register(shutil.rmtree, home, True)
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import conftest  # noqa: F401  offline environment, as for the tests
    from _bentoml_impl.tasks.result import Sqlite3Store
    from bentoml._internal.configuration.containers import BentoMLContainer
    from rewardscope.service.app import RewardService
    from starlette.testclient import TestClient

    Sqlite3Store.init_db(BentoMLContainer.result_store_file.get())  # `bentoml serve` does this before workers
    bus = conftest.ultralytics_asset("bus.jpg").read_bytes()
    scratch = Path("/tmp") / f"rsaudit{uuid.uuid4().hex}"
    scratch.mkdir()
    image_path = base64_valid_image_path(scratch, bus)
    recorder = AuditRecorder({"/etc/passwd", str(image_path)})
    sys.addaudithook(recorder)

    app = RewardService.to_asgi()
    report: dict[str, Any] = {"auth": [], "requests": [], "controls": {}}
    with TestClient(app, raise_server_exceptions=False) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        inventory = route_inventory(app)
        report["openapi_paths"] = sorted(client.get("/docs.json", headers=auth).json()["paths"])
        for path in report["openapi_paths"]:
            inventory.setdefault(path, set())
        report["routes"] = {path: sorted(methods) for path, methods in sorted(inventory.items())}
        report["auth"] = check_auth(client, inventory)

        requests = hostile_requests(bus, image_path, inventory)
        for request in requests:  # warm-up: first-use imports and code generation happen here, unrecorded
            send(client, request, auth)
        recorder.recording = True
        for request in requests:
            report["requests"].append(send(client, request, auth))
        recorder.recording = False
        report["events"] = list(recorder.events)

        report["controls"] = controls(recorder)
    report["image_path"] = str(image_path)
    Path(report_path).write_text(json.dumps(report))
    shutil.rmtree(scratch)


def check_auth(client: Any, inventory: dict[str, set[str]]) -> list[dict[str, Any]]:
    """Every path x (GET, POST, its own methods) x (no token, wrong tokens): status and WWW-Authenticate."""
    credentials = {
        "none": {},
        "wrong": {"Authorization": "Bearer wrong-token"},
        "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
        "longer": {"Authorization": f"Bearer {TOKEN}x"},
        "empty": {"Authorization": "Bearer "},
        "basic-scheme": {"Authorization": f"Basic {TOKEN}"},
        "token-alone": {"Authorization": TOKEN},
    }
    results = []
    for path, methods in sorted(inventory.items()):
        for method in sorted({"GET", "POST", *methods} - {"HEAD"}):
            for name, headers in credentials.items():
                response = client.request(method, path, headers=headers)
                results.append(
                    {
                        "path": path,
                        "method": method,
                        "credential": name,
                        "status": response.status_code,
                        "www_authenticate": response.headers.get("www-authenticate"),
                    }
                )
        if path not in ("/metrics",):  # TestClient hangs on an authorised /metrics; the guard never lets it reach
            response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            results.append({"path": path, "method": "GET", "credential": "right", "status": response.status_code})
    return results


def hostile_requests(bus: bytes, image_path: Path, inventory: dict[str, set[str]]) -> list[dict[str, Any]]:
    """(name, method, path, body, expectation). Expectations: "4xx"; "415"; "refused:<n>": 200 with the first n items
    failed (error set, values null); "answered": any status below 500 (the point is the audit)."""
    npy = pickled_npy()
    raw_pickle = pickle.dumps({"items": [{"image": Unpickled(), "prompt": PROMPT}]})
    hostile_items = [
        {"image": f"http://127.0.0.1:9/{CANARY}.png", "prompt": PROMPT},
        {"image": f"https://example.com/{CANARY}.png", "prompt": PROMPT},
        {"image": "file:///etc/passwd", "prompt": PROMPT},
        {"image": "/etc/passwd", "prompt": PROMPT},
        {"image": str(image_path), "prompt": PROMPT},
        {"array": b64(npy), "prompt": PROMPT},
        {"array": b64(raw_pickle), "prompt": PROMPT},
        {"array": "file:///etc/passwd", "prompt": PROMPT},
        {"image": b64(bus), "prompt": PROMPT, "rewards": ["feedback:/etc/passwd"]},
    ]
    refused = f"refused:{len(hostile_items)}"
    scored_with_odd_metadata = {
        "image": b64(bus),
        "prompt": PROMPT,
        "metadata": {CANARY: f"__import__('{CANARY}')", "include": [{"class": CANARY, "count": 1}]},
    }
    items = [*hostile_items, scored_with_odd_metadata]
    match_items = [{k: v for k, v in item.items() if k != "rewards"} for item in hostile_items[:8]]
    requests = [
        {"name": "score", "method": "POST", "path": "/score", "json": {"items": items}, "expect": refused},
        {
            "name": "match",
            "method": "POST",
            "path": "/match",
            "json": {"items": [{**item, "variant": "geneval"} for item in match_items]},
            "expect": "refused:8",
        },
        {
            "name": "rank",
            "method": "POST",
            "path": "/rank",
            "json": {
                "groups": [
                    {"prompt": PROMPT, "candidates": [{k: v for k, v in i.items() if k in ("image", "array")}]}
                    for i in match_items
                ]
            },
            "expect": "answered",
        },
        {
            "name": "job-submit",
            "method": "POST",
            "path": "/jobs/score/submit",
            "json": {"items": items},
            "poll": True,
            "expect": refused,
        },
        {
            "name": "upload-pickled-files",
            "method": "POST",
            "path": "/score/upload",
            "files": [
                ("images", ("a.npy", npy, "application/octet-stream")),
                ("images", ("b.pkl", raw_pickle, "image/png")),
            ],
            "data": {"prompts": json.dumps([PROMPT, PROMPT])},
            "expect": "refused:2",
        },
        {
            "name": "upload-url-for-file",
            "method": "POST",
            "path": "/score/upload",
            "data": {"images": f"http://127.0.0.1:9/{CANARY}.png", "prompts": json.dumps([PROMPT])},
            "expect": "4xx",
        },
        {
            "name": "upload-file-url-for-file",
            "method": "POST",
            "path": "/score/upload",
            "data": {"images": "file:///etc/passwd", "prompts": json.dumps([PROMPT])},
            "expect": "4xx",
        },
        {
            "name": "bentoml-multipart-to-score",
            "method": "POST",
            "path": "/score",
            # A urlencoded form body, which BentoML's form serde would parse: the guard refuses the content type.
            "data": {"items": json.dumps(hostile_items)},
            "expect": "415",
        },
        {
            "name": "job-status-traversal",
            "method": "GET",
            "path": "/jobs/score/status?task_id=../../etc/passwd",
            "expect": "4xx",
        },
        {
            "name": "job-get-injection",
            "method": "GET",
            "path": "/jobs/score/get?task_id=%27%20OR%201%3D1%20--",
            "expect": "4xx",
        },
        {
            "name": "job-cancel-unknown",
            "method": "PUT",
            "path": f"/jobs/score/cancel?task_id={CANARY}",
            "expect": "4xx",
        },
        {"name": "job-retry-unknown", "method": "POST", "path": f"/jobs/score/retry?task_id={CANARY}", "expect": "4xx"},
        {
            "name": "static-traversal",
            "method": "GET",
            "path": "/static_content/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            "expect": "4xx",
        },
    ]
    for path, methods in sorted(inventory.items()):  # every POST route, new ones included
        if "POST" not in methods:
            continue
        requests.append(
            {
                "name": f"pickle-content-type {path}",
                "method": "POST",
                "path": path,
                "content": raw_pickle,
                "headers": {"content-type": "application/vnd.bentoml+pickle"},
                "expect": "415",
            }
        )
        requests.append(
            {
                "name": f"pickled-arrays {path}",
                "method": "POST",
                "path": path,
                # The one item shape every batch endpoint takes (/score, /match, /grad, jobs): arrays, no image.
                "json": {
                    "items": [{"array": b64(npy), "prompt": PROMPT}, {"array": b64(raw_pickle), "prompt": PROMPT}]
                },
                "expect": "answered",
            }
        )
    for path in ("/rewards", "/golden", "/docs.json", "/schema.json", "/", "/livez", "/readyz", "/healthz"):
        requests.append(
            {"name": f"get {path}", "method": "GET", "path": f"{path}?file=/etc/passwd", "expect": "answered"}
        )
    return requests


def send(client: Any, request: dict[str, Any], auth: dict[str, str]) -> dict[str, Any]:
    keys = ("json", "data", "files", "content")
    response = client.request(
        request["method"],
        request["path"],
        headers={**auth, **request.get("headers", {})},
        **{key: request[key] for key in keys if key in request},
    )
    answer = {"name": request["name"], "expect": request["expect"], "status": response.status_code}
    answer["body"] = response.text[:4000]
    if request.get("poll") and response.status_code == 200:
        task_id = response.json()["task_id"]
        deadline = time.monotonic() + 60
        status = "pending"
        while status in ("pending", "in_progress") and time.monotonic() < deadline:
            time.sleep(0.2)
            status = client.get(f"/jobs/score/status?task_id={task_id}", headers=auth).json()["status"]
        answer["job_status"] = status
        answer["body"] = client.get(f"/jobs/score/get?task_id={task_id}", headers=auth).text[:4000]
    return answer


def controls(recorder: AuditRecorder) -> dict[str, bool]:
    """The same hook, fed forbidden acts on purpose: proof that it would have seen them in the requests."""
    import socket

    acts = {
        "unpickle": lambda: pickle.loads(pickle.dumps(Unpickled())),
        "eval-request-text": lambda: eval(repr(CANARY)),  # noqa: S307  the control for the compile filter
        "socket-connect": lambda: socket.create_connection(("127.0.0.1", 9), timeout=0.2),
        "open-named-path": lambda: open("/etc/passwd", "rb").close(),  # noqa: SIM115
    }
    seen = {}
    for name, act in acts.items():
        recorder.events.clear()
        recorder.recording = True
        try:
            act()
        except OSError:
            pass  # nothing listens on port 9: the connect attempt is what counts
        finally:
            recorder.recording = False
        seen[name] = bool(recorder.events)
    recorder.events.clear()
    return seen


# ---------------------------------------------------------------------------------------------------------------
# (a) and (b): assertions on the child's report.


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("audit") / "report.json"
    result = subprocess.run(
        [sys.executable, __file__, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(path.read_text())


@pytest.mark.slow
def test_the_audit_hook_sees_each_forbidden_act_it_filters_for(report):
    assert report["controls"] == {
        "unpickle": True,
        "eval-request-text": True,
        "socket-connect": True,
        "open-named-path": True,
    }


@pytest.mark.slow
def test_no_request_reaches_pickle_exec_a_url_fetch_a_subprocess_or_a_named_file(report):
    assert len(report["requests"]) > 20
    assert report["events"] == []


@pytest.mark.slow
def test_every_hostile_request_is_refused_or_answered_without_a_server_error(report):
    for request in report["requests"]:
        name, status, expect = request["name"], request["status"], request["expect"]
        assert status < 500, (name, status, request["body"][:500])
        if expect == "4xx":
            assert 400 <= status < 500, (name, status, request["body"][:500])
        elif expect == "415":
            assert status == 415, (name, status, request["body"][:500])
        elif expect.startswith("refused:"):
            count = int(expect.partition(":")[2])
            assert status == 200, (name, status, request["body"][:500])
            results = json.loads(request["body"])
            for result in results[:count]:
                assert result["error"] and result["error_code"], (name, result)
                values = result.get("rewards", {"score": result.get("score")}).values()
                assert all(value is None for value in values), (name, result)


@pytest.mark.slow
def test_the_pickle_content_type_is_refused_on_every_post_route(report):
    prefix = "pickle-content-type "
    answers = {r["name"].removeprefix(prefix): r for r in report["requests"] if r["name"].startswith(prefix)}
    posts = {path for path, methods in report["routes"].items() if "POST" in methods}
    assert posts and set(answers) == posts
    for path, answer in answers.items():  # the guard refuses it before any endpoint (task submissions too)
        assert answer["status"] == 415 and "application/json" in answer["body"], (path, answer)


@pytest.mark.slow
def test_the_route_inventory_covers_the_openapi_schema_and_the_mounted_routes(report):
    routes = set(report["routes"])
    assert set(report["openapi_paths"]) <= routes
    # Ours (mounted Starlette routes), BentoML's generated task routes and probes: all found by the walk.
    assert {"/score", "/match", "/rank", "/rewards", "/golden", "/score/upload", "/jobs/score/submit"} <= routes
    assert PROBES <= routes


@pytest.mark.slow
def test_every_route_but_the_health_probes_needs_the_bearer_token(report):
    unauthorised = [entry for entry in report["auth"] if entry["credential"] not in ("right",)]
    checked = {(entry["path"], entry["method"]) for entry in unauthorised}
    assert {(path, method) for path in report["routes"] for method in ("GET", "POST")} <= checked
    for entry in unauthorised:
        if entry["path"] in PROBES:
            assert entry["status"] != 401, entry
        else:
            assert entry["status"] == 401 and entry["www_authenticate"] == "Bearer", entry


@pytest.mark.slow
def test_the_right_token_gets_through(report):
    right = {entry["path"]: entry["status"] for entry in report["auth"] if entry["credential"] == "right"}
    assert right["/rewards"] == 200 and right["/docs.json"] == 200 and right["/livez"] == 200
    assert all(status != 401 for status in right.values()), right


def test_the_token_is_compared_in_constant_time_only():
    """guard.py compares the credential with hmac.compare_digest and never with ==, != or `in`."""
    tree = ast.parse((ROOT / "service" / "guard.py").read_text())
    digests = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "hmac.compare_digest"
    ]
    assert digests and any("self.token" in ast.unparse(node) for node in digests)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and "token" in ast.unparse(node):
            assert all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops), ast.unparse(node)


# ---------------------------------------------------------------------------------------------------------------
# (c) Model files: ONNX, safetensors or weights_only checkpoints only.

SCANNED = ("models", "service", "kernels", "client/rewardscope_client")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "joblib", "shelve"}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader")
NO_WEIGHTS = ("Tokenizer", "Processor", "Config", "FeatureExtractor")
# Deliberate exceptions: (file, enclosing function, rule) -> why it is safe. Each must still match something.
ALLOWED = {
    ("models/hf.py", "load_pretrained", "from_pretrained"): (
        "the one generic loader: it adds use_safetensors=True for every loader that reads weights (a model or Auto "
        "model class) at run time; pinned by test_a_model_directory_with_only_pytorch_model_bin_is_refused"
    ),
    ("models/detection/export.py", "export_ultralytics", "ultralytics YOLO"): (
        "`rewardscope export-detector`: an operator converts a checkpoint they chose to ONNX, offline; no request "
        "reaches it, and what the service loads is the resulting ONNX"
    ),
}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _pickle_only_for_its_exception(tree: ast.Module, name: str) -> bool:
    """`import pickle` used only as `pickle.UnpicklingError` (to catch a refused weights_only load)."""
    uses = [node for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == name]
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return bool(uses) and all(
        isinstance(parents.get(id(use)), ast.Attribute) and parents[id(use)].attr == "UnpicklingError" for use in uses
    )


def scan(tree: ast.Module) -> Iterator[tuple[int, str, str, str]]:
    """(line, enclosing function, rule, code) for every unsafe-loading construct in a module."""
    functions: dict[int, str] = {}  # id(node) -> innermost enclosing function

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        functions[id(node)] = function
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    for node in ast.walk(tree):
        where = functions[id(node)]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in PICKLE_MODULES:
                    imported = [alias.asname or alias.name for alias in node.names]
                    if isinstance(node, ast.ImportFrom) and imported == ["UnpicklingError"]:
                        continue
                    if isinstance(node, ast.Import) and all(_pickle_only_for_its_exception(tree, n) for n in imported):
                        continue
                    yield node.lineno, where, f"{module} import", ast.unparse(node)
        if not isinstance(node, ast.Call):
            continue
        callee = ast.unparse(node.func)
        code = ast.unparse(node)[:160]
        if callee in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            yield node.lineno, where, f"{callee}()", code
        elif callee == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            yield node.lineno, where, "torch.load without weights_only=True", code
        elif callee in ("torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url", "torch.package"):
            yield node.lineno, where, callee, code
        elif callee in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            yield node.lineno, where, callee, code
        elif callee in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or not ast.unparse(loader).endswith(SAFE_YAML_LOADERS):
                yield node.lineno, where, "yaml.load without SafeLoader", code
        elif callee.endswith("read_pickle"):
            yield node.lineno, where, "read_pickle", code
        elif callee.endswith(".from_pretrained"):
            receiver = callee.removesuffix(".from_pretrained").rsplit(".", 1)[-1]
            if not _is_true(_keyword(node, "use_safetensors")) and not receiver.endswith(NO_WEIGHTS):
                yield node.lineno, where, "from_pretrained", code
        elif callee in ("YOLO", "ultralytics.YOLO"):
            yield node.lineno, where, "ultralytics YOLO", code
        allow_pickle = _keyword(node, "allow_pickle")
        if allow_pickle is not None and not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
            yield node.lineno, where, "allow_pickle not False", code


def scanned_files() -> list[Path]:
    return sorted(file for folder in SCANNED for file in (ROOT / folder).rglob("*.py"))


def test_sources_load_models_only_as_onnx_safetensors_or_weights_only_checkpoints():
    findings, allowed_hits = [], set()
    for file in scanned_files():
        relative = file.relative_to(ROOT).as_posix()
        for line, function, rule, code in scan(ast.parse(file.read_text(), str(file))):
            if (relative, function, rule) in ALLOWED:
                allowed_hits.add((relative, function, rule))
            else:
                findings.append(f"{relative}:{line} in {function}: {rule}: {code}")
    assert findings == []
    assert allowed_hits == set(ALLOWED), f"stale exemptions: {set(ALLOWED) - allowed_hits}"


@pytest.mark.parametrize(
    "source, rule",
    [
        ("import torch\ntorch.load('w.pt')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('w.pt', weights_only=False)", "torch.load without weights_only=True"),
        ("import pickle\npickle.loads(b'')", "pickle import"),
        ("from pickle import loads", "pickle import"),
        ("import dill", "dill import"),
        ("import marshal", "marshal import"),
        ("eval(text)", "eval()"),
        ("exec(text)", "exec()"),
        ("import yaml\nyaml.load(text)", "yaml.load without SafeLoader"),
        ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml.load without SafeLoader"),
        ("import yaml\nyaml.unsafe_load(text)", "yaml.unsafe_load"),
        ("import numpy as np\nnp.load(path, allow_pickle=True)", "allow_pickle not False"),
        ("from transformers import CLIPModel\nCLIPModel.from_pretrained(path)", "from_pretrained"),
        (
            "from transformers import AutoModel\nAutoModel.from_pretrained(path, use_safetensors=False)",
            "from_pretrained",
        ),
        ("import torch\ntorch.hub.load('repo', 'model')", "torch.hub.load"),
    ],
)
def test_the_scanner_flags_each_unsafe_construct(source, rule):
    assert [finding[2] for finding in scan(ast.parse(source))] == [rule]


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=True)",
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
        "import ast\nast.literal_eval(text)",
        "model.eval()",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(text)",
        "import numpy as np\nnp.load(path, allow_pickle=False)",
        "CLIPModel.from_pretrained(path, use_safetensors=True)",
        "AutoTokenizer.from_pretrained(path)",
        "AutoProcessor.from_pretrained(path)",
    ],
)
def test_the_scanner_passes_safe_equivalents(source):
    assert list(scan(ast.parse(source))) == []


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny CLIP saved as safetensors, and the same model with only a pickled pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file
    from tiny_clip import make_tiny_clip

    safe = make_tiny_clip(tmp_path_factory.mktemp("clip-safetensors"))
    pickled = tmp_path_factory.mktemp("clip-pickle")
    for file in safe.iterdir():
        if file.suffix != ".safetensors":
            (pickled / file.name).write_bytes(file.read_bytes())
    torch.save(load_file(str(safe / "model.safetensors")), pickled / "pytorch_model.bin")
    return safe, pickled


def test_a_model_directory_with_only_pytorch_model_bin_is_refused(clip_dirs):
    import torch
    from rewardscope.models.clip import ClipBackbone
    from rewardscope.models.hf import ModelNotFoundError, load_pretrained, resolve_model
    from transformers import AutoProcessor, CLIPModel

    safe, pickled = clip_dirs
    for load in (
        lambda: load_pretrained(CLIPModel, resolve_model(pickled)),
        lambda: ClipBackbone(str(pickled), None, "cpu", torch.float32),
    ):
        with pytest.raises(ModelNotFoundError, match=r"only pickled PyTorch weights \(pytorch_model\.bin\)"):
            load()
    # The same files with safetensors weights load; a processor reads no weights, so the pickle does not matter.
    assert isinstance(load_pretrained(CLIPModel, resolve_model(safe)), CLIPModel)
    assert ClipBackbone(str(safe), None, "cpu", torch.float32).embedding_dim > 0
    assert load_pretrained(AutoProcessor, resolve_model(pickled)) is not None


def test_hub_downloads_never_fetch_pickled_weights():
    from rewardscope.models.hf import HUB_PATTERNS

    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "open_clip_pytorch_model.bin"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_PATTERNS), name
    assert any(fnmatch.fnmatch("model.safetensors", pattern) for pattern in HUB_PATTERNS)


if __name__ == "__main__":
    child(sys.argv[1])
