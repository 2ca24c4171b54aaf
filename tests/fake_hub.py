"""A small in-memory Hugging Face Hub, served over HTTP on 127.0.0.1 for tests.

It answers the requests the real ``huggingface_hub`` client makes to create a repo or a branch, commit files
(the preupload + NDJSON commit endpoints, with every file uploaded "regular": no LFS, no Xet), validate a card's
YAML, describe a repo (``model_info``), list its files (``/tree/``) and download a file (``/resolve/``, with the
ETag and X-Repo-Commit headers ``hf_hub_download`` needs), and it answers errors with the ``X-Error-Code`` headers
the client maps to RepositoryNotFoundError, RevisionNotFoundError and EntryNotFoundError. Tests point the client at
it instead of huggingface.co, so a round trip exercises the real client code with no network; :func:`go_offline`
keeps every other test off the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from huggingface_hub import constants

__all__ = ["FakeHub", "FakeRepo", "git_blob_sha1", "go_offline"]

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)"), "create_branch"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)"), "tree"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "model_info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as ETag and oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def go_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep a test off huggingface.co: offline, with a private cache under ``tmp_path`` and a fake token."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")


@dataclass
class FakeRepo:
    """One model repo: commits (id -> files) and refs (branch or ``refs/pr/N`` -> commit id)."""

    private: bool | None = None
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    pull_requests: int = 0

    def commit(self, files: dict[str, bytes], ref: str, message: str) -> str:
        """Record a commit of ``files`` (the full tree) on ``ref``; return its 40-hex id."""
        oid = hashlib.sha1(
            f"{len(self.commits)}:{ref}:{message}".encode() + repr(sorted(files.items())).encode()
        ).hexdigest()
        self.commits[oid] = dict(files)
        self.messages[oid] = message
        self.refs[ref] = oid
        return oid

    def tree(self, revision: str) -> dict[str, bytes] | None:
        """Files at a branch, PR ref or full commit id; ``None`` if there is no such revision."""
        oid = self.resolve(revision)
        return None if oid is None else self.commits[oid]

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """The server: ``with FakeHub() as hub: ...`` serves ``hub.endpoint`` until the block ends.

    ``hub.repos`` holds the state, ``hub.requests`` every ``(method, path)`` served, in order.
    """

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the FakeHub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(self, repo_id: str, files: dict[str, bytes], message: str = "initial") -> str:
        """Create a repo with ``files`` on ``main`` directly (to serve repos the code under test did not push)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, FakeRepo())
            return repo.commit({".gitattributes": b"", **files}, "main", message)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        tree = self.repos[repo_id].tree(revision)
        assert tree is not None, f"{repo_id} has no revision {revision}"
        return tree


class _Handler(BaseHTTPRequestHandler):
    server_hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        hub = self.server_hub
        with hub.lock:
            hub.requests.append((method, url.path))
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(url.path)
            if route_method == method and match:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                with hub.lock:
                    getattr(self, name)(method=method, query=query, **params)
                return
        self._send(404, {"error": f"no route for {method} {url.path}"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, payload: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    # ------------------------------------------------------------------ endpoints

    def create_repo(self, method: str, query: dict[str, str]) -> None:
        payload = json.loads(self._body())
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.server_hub.endpoint}/{repo_id}"
        if repo_id in self.server_hub.repos:
            self._send(409, {"error": "You already created this model repo", "url": url})
            return
        repo = self.server_hub.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
        repo.commit(
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "main", "initial commit"
        )
        self._send(200, {"url": url, "name": repo_id})

    def validate_yaml(self, method: str, query: dict[str, str]) -> None:
        content = json.loads(self._body())["content"]
        match = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---", content)
        try:
            ok = match is None or isinstance(yaml.safe_load(match.group(1)) or {}, dict)
        except yaml.YAMLError:
            ok = False
        if ok:
            self._send(200, {"errors": [], "warnings": []})
        else:
            self._send(400, {"errors": [{"message": "metadata is not a YAML mapping"}], "warnings": []})

    def preupload(self, method: str, query: dict[str, str], repo: str, rev: str) -> None:
        payload = json.loads(self._body())
        state = self._repo(repo)
        if state is None:
            return
        tree = state.tree(rev) or {}
        files = [
            {
                "path": entry["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(tree[entry["path"]]) if entry["path"] in tree else None,
            }
            for entry in payload["files"]
        ]
        self._send(200, {"files": files})

    def commit(self, method: str, query: dict[str, str], repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        state = self._repo(repo)
        if state is None:
            return
        tree = state.tree(rev)
        if tree is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        files = dict(tree)
        summary = ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                self._send(400, {"error": f"this fake hub does not support {key!r} commit lines"})
                return
        create_pr = query.get("create_pr") == "1"
        if create_pr:
            state.pull_requests += 1
            ref = f"refs/pr/{state.pull_requests}"
        else:
            ref = rev
        oid = state.commit(files, ref, summary)
        endpoint = self.server_hub.endpoint
        self._send(
            200,
            {
                "commitUrl": f"{endpoint}/{repo}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": f"{endpoint}/{repo}/discussions/{state.pull_requests}" if create_pr else None,
            },
        )

    def create_branch(self, method: str, query: dict[str, str], repo: str, branch: str) -> None:
        payload = json.loads(self._body() or b"{}")
        state = self._repo(repo)
        if state is None:
            return
        if branch in state.refs:
            self._send(409, {"error": "Reference already exists"})
            return
        start = state.resolve(payload.get("startingPoint") or "main")
        if start is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {payload.get('startingPoint')}")
            return
        state.refs[branch] = start
        self._send(200, {})

    def model_info(self, method: str, query: dict[str, str], repo: str, rev: str = "main") -> None:
        state = self._repo(repo)
        if state is None:
            return
        oid = state.resolve(rev)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        siblings = [{"rfilename": path} for path in sorted(state.commits[oid])]
        self._send(200, {"id": repo, "sha": oid, "private": bool(state.private), "siblings": siblings})

    def tree(self, method: str, query: dict[str, str], repo: str, rev: str) -> None:
        """Every file of a revision (``recursive=true`` listing, as ``snapshot_download`` asks for it)."""
        state = self._repo(repo)
        if state is None:
            return
        oid = state.resolve(unquote(rev))
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        files = state.commits[oid]
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            for path, data in sorted(files.items())
        ]
        self._send(200, entries)

    def resolve(self, method: str, query: dict[str, str], repo: str, rev: str, path: str) -> None:
        state = self._repo(repo)
        if state is None:
            return
        oid = state.resolve(rev)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        data = state.commits[oid].get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": oid})
            return
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": oid, "Content-Type": "application/octet-stream"}
        self._send(200, headers=headers, raw=data)
