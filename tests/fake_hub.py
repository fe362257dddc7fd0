"""A stand-in for the Hugging Face Hub on the loopback address, for tests that fetch weights.

It answers what huggingface_hub's `hf_hub_download` asks (HEAD, then GET, of
``/<org>/<repo>/resolve/<revision>/<file>``) as the Hub does for a file it
serves itself: the commit in ``X-Repo-Commit``, the file's sha256 (the LFS
object id) in ``X-Linked-Etag`` and ``ETag``, its size in ``X-Linked-Size`` and
``Content-Length``; and a missing repository, revision or file with a 404 and
the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound).
Every request is recorded, so that a test can tell that none was made;
`cut_downloads` GETs are broken off halfway, as by a lost connection.
"""

import hashlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote

COMMIT = '0123456789abcdef0123456789abcdef01234567'


@dataclass
class HubFile:
    served: bytes  # the bytes sent
    sha256: str  # the digest advertised


class FakeHub:
    """Serves files added with `add`; `url` is its endpoint (HF_ENDPOINT)."""

    def __init__(self):
        self.repos: Dict[str, Dict[str, HubFile]] = {}
        self.requests: List[Tuple[str, str]] = []
        self.before_download: Optional[Callable[[], None]] = None  # called before a file's bytes go out
        self.cut_downloads = 0
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self.url = f'http://127.0.0.1:{self.server.server_port}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo: str, filename: str, data: bytes, served: Optional[bytes] = None) -> None:
        """Serve `data` as `filename` of `repo` (or `served` in its place, under the digest of `data`)."""
        self.repos.setdefault(repo, {})[filename] = HubFile(data if served is None else served,
                                                            hashlib.sha256(data).hexdigest())

    def downloads(self, filename: str) -> int:
        return sum(1 for method, path in self.requests if method == 'GET' and path.endswith('/' + filename))

    def stop(self) -> None:
        """Stop answering (again: nothing more)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, headers: Dict[str, str], body: bytes = b'') -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if self.command == 'GET' and body:
                    if hub.before_download is not None:
                        hub.before_download()
                    if hub.cut_downloads:
                        hub.cut_downloads -= 1
                        self.wfile.write(body[:len(body) // 2])
                        self.close_connection = True
                        return
                    self.wfile.write(body)

            def _resolve(self):
                hub.requests.append((self.command, self.path))
                parts = unquote(self.path.split('?')[0]).lstrip('/').split('/')
                if len(parts) < 5 or parts[2] != 'resolve':
                    return self._answer(404, {'X-Error-Code': 'RepoNotFound'})
                repo, revision, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
                if repo not in hub.repos:
                    return self._answer(404, {'X-Error-Code': 'RepoNotFound'})
                if revision not in ('main', COMMIT):
                    return self._answer(404, {'X-Error-Code': 'RevisionNotFound'})
                found = hub.repos[repo].get(filename)
                if found is None:
                    return self._answer(404, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': COMMIT})
                self._answer(200, {'X-Repo-Commit': COMMIT, 'ETag': f'"{found.sha256}"',
                                   'X-Linked-Etag': f'"{found.sha256}"', 'X-Linked-Size': str(len(found.served)),
                                   'Accept-Ranges': 'bytes', 'Content-Type': 'application/octet-stream'},
                             found.served)

            do_HEAD = _resolve
            do_GET = _resolve

        return Handler
