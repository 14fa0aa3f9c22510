"""Uploaded bytes or text -> plain text blocks that remember their heading path.

Supported: text/plain (paragraphs), text/markdown (ATX and setext headings, fenced code,
front matter, links reduced to their text) and application/pdf (pypdf text extraction;
the PDF outline, when present, gives the heading path of each page). Bad input becomes an
`ApiError`: 400 unreadable or empty, 413 too large, 415 unsupported type, 422 not parsed
within `parse_timeout_s`.

In the Retriever, parsing runs in a `ParserPool` (worker processes with a time limit per
document), outside the replica's event loop and GIL; elsewhere (tests, tools) in-process.
"""
from __future__ import annotations

import base64
import binascii
import io
import queue
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from serve_app import textmatch
from serve_app.errors import ApiError, is_error_payload
from serve_app.rag.config import SUPPORTED_CONTENT_TYPES, RagSettings
from serve_app.rag.models import DocumentIn

CONTENT_TYPE_ALIASES = {
    "text/x-markdown": "text/markdown",
    "text/md": "text/markdown",
    "text/x-md": "text/markdown",
    "application/markdown": "text/markdown",
    "application/x-pdf": "application/pdf",
    "text/txt": "text/plain",
}


@dataclass(frozen=True)
class Block:
    """A paragraph (or code block) and the headings it sits under, outermost first."""

    text: str
    headings: tuple[str, ...] = ()
    page: int | None = None  # 1-based, PDFs only


@dataclass(frozen=True)
class ParsedDocument:
    content_type: str
    blocks: list[Block]
    title: str | None = None  # detected: front matter, first heading, PDF metadata
    n_bytes: int = 0
    pages: int | None = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- entry point
def load_document(doc: DocumentIn, settings: RagSettings,
                  param: str = "document") -> ParsedDocument:
    """Decode, type-check, size-check and parse one uploaded document."""
    content_type = normalise_content_type(doc.content_type) if doc.content_type else None
    if doc.content is not None:
        data: bytes | str = doc.content
        n_bytes = len(doc.content.encode("utf-8", errors="surrogatepass"))
        _check_size(n_bytes, settings, f"{param}.content")
        content_type = content_type or "text/plain"
        if content_type == "application/pdf":
            raise ApiError(400, "A PDF must be sent base64-encoded in `content_b64`.",
                           code="invalid_content", param=f"{param}.content")
    else:
        raw = doc.content_b64 or ""
        # Refuse before decoding: base64 is 4/3 the size of the bytes it holds.
        _check_size(len(raw) * 3 // 4 - 2, settings, f"{param}.content_b64")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "`content_b64` is not valid base64.", code="invalid_content",
                           param=f"{param}.content_b64") from exc
        n_bytes = len(data)
        _check_size(n_bytes, settings, f"{param}.content_b64")
        content_type = content_type or sniff_content_type(data, f"{param}.content_type")
    _check_allowed(content_type, settings, f"{param}.content_type")
    parsed = (_pool.parse if _pool is not None else parse)(
        data, content_type, settings=settings, param=param)
    if not any(block.text.strip() for block in parsed.blocks):
        hint = (" (a scanned PDF without a text layer? OCR is not supported)"
                if content_type == "application/pdf" else "")
        raise ApiError(400, f"Document {doc.id!r} has no text{hint}.", code="empty_document",
                       param=param)
    return ParsedDocument(parsed.content_type, parsed.blocks, parsed.title, n_bytes,
                          parsed.pages, parsed.warnings)


def parse(data: bytes | str, content_type: str, *, settings: RagSettings | None = None,
          param: str = "document") -> ParsedDocument:
    settings = settings or RagSettings()
    if content_type == "application/pdf":
        if isinstance(data, str):
            raise ApiError(400, "A PDF must be given as bytes.", code="invalid_content",
                           param=param)
        return parse_pdf(data, max_pages=settings.max_pdf_pages, param=param)
    text = data if isinstance(data, str) else decode_text(data, param)
    if content_type == "text/markdown":
        return parse_markdown(text)
    if content_type == "text/plain":
        return parse_plain_text(text)
    raise _unsupported(content_type, list(SUPPORTED_CONTENT_TYPES), param)


# ---------------------------------------------------------------------------- content types
def normalise_content_type(value: str) -> str:
    base = value.split(";", 1)[0].strip().lower()
    return CONTENT_TYPE_ALIASES.get(base, base)


def sniff_content_type(data: bytes, param: str) -> str:
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "application/pdf"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(415, "Could not tell the type of `content_b64`; set `content_type` "
                       f"to one of {', '.join(SUPPORTED_CONTENT_TYPES)}.",
                       code="unsupported_media_type", param=param) from exc
    return "text/plain"


def _check_allowed(content_type: str, settings: RagSettings, param: str) -> None:
    if content_type not in settings.allowed_content_types:
        raise _unsupported(content_type, settings.allowed_content_types, param)


def _unsupported(content_type: str, allowed: list[str], param: str) -> ApiError:
    return ApiError(415, f"Unsupported content type {content_type!r}; supported: "
                    f"{', '.join(allowed)}.", code="unsupported_media_type", param=param)


def _check_size(n_bytes: int, settings: RagSettings, param: str) -> None:
    if n_bytes > settings.max_document_bytes:
        raise ApiError(413, f"Document is larger than {settings.max_document_bytes} bytes.",
                       code="document_too_large", param=param)


def decode_text(data: bytes, param: str = "document") -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "Text documents must be UTF-8.", code="invalid_content",
                       param=param) from exc


# Document text is untrusted: plain string code or linear-time patterns (serve_app.textmatch)
# only. Python's `re` took quadratic time on "<!--" * n, "[a" * n, "**" * n, ...
_CONTROL = {code: None for code in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}


def clean_text(text: str) -> str:
    """Unix newlines, no control characters (tabs and newlines stay)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)


# ---------------------------------------------------------------------------- plain text
_BLANK_LINES = textmatch.compile(r"\n[ \t]*\n+")


def parse_plain_text(text: str) -> ParsedDocument:
    return ParsedDocument("text/plain", [Block(p) for p in paragraphs(clean_text(text))])


def paragraphs(text: str) -> list[str]:
    out = []
    for chunk in _BLANK_LINES.split(text):
        lines = [line.rstrip() for line in chunk.strip("\n").split("\n")]
        para = "\n".join(lines).strip()
        if para:
            out.append(para)
    return out


# ---------------------------------------------------------------------------- markdown
_ATX = textmatch.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = textmatch.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = textmatch.compile(r"^ {0,3}(`{3,}|~{3,})")
_IMAGE = textmatch.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = textmatch.compile(r"\[([^\]]+)\]\([^)]*\)")
_COMMENT = textmatch.compile(r"<!--.*?-->", dotall=True)
# Was `(\*\*|__|`)(.+?)\1`; RE2 has no backreference, so one alternative per delimiter.
_EMPHASIS = textmatch.compile(r"\*\*(.+?)\*\*|__(.+?)__|`(.+?)`")


def inline_text(text: str) -> str:
    """Markdown inline markup -> its visible text."""
    text = _IMAGE.sub(lambda m: m.group(1), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    return _EMPHASIS.sub(lambda m: m.group(1) or m.group(2) or m.group(3), text)


def _thematic_break(line: str) -> bool:
    """`^ {0,3}([-*_])([ \t]*\1){2,}[ \t]*$` (a backreference) in plain string code: up to
    three spaces, then three or more of one of - * _, with spaces and tabs between."""
    rest = line.lstrip(" ")
    if len(line) - len(rest) > 3 or rest[:1] not in ("-", "*", "_"):
        return False
    marks = rest.replace(" ", "").replace("\t", "")
    return len(marks) >= 3 and marks == rest[0] * len(marks)


def parse_markdown(text: str) -> ParsedDocument:
    text = _COMMENT.sub("", clean_text(text))
    lines = text.split("\n")
    front_title, start = _front_matter(lines)
    builder = _MarkdownBuilder()
    fence: str | None = None
    for line in lines[start:]:
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                builder.flush_code()
                fence = None
            else:
                builder.code.append(line)
            continue
        if match := _FENCE.match(line):
            builder.flush_paragraph()
            fence = match.group(1)
            continue
        if match := _ATX.match(line):
            builder.heading(len(match.group(1)), match.group(2) or "")
            continue
        if builder.para and (match := _SETEXT.match(line)):
            title = " ".join(part.strip() for part in builder.para)
            builder.para = []
            builder.heading(1 if match.group(1).startswith("=") else 2, title)
            continue
        if _thematic_break(line) or not line.strip():
            builder.flush_paragraph()
            continue
        builder.para.append(line.rstrip())
    if fence is not None:
        builder.flush_code()
    builder.flush_paragraph()
    return ParsedDocument("text/markdown", builder.blocks, front_title or builder.first_title)


class _MarkdownBuilder:
    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.stack: list[tuple[int, str]] = []
        self.para: list[str] = []
        self.code: list[str] = []
        self.first_title: str | None = None

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(title for _, title in self.stack if title)

    def heading(self, level: int, raw: str) -> None:
        self.flush_paragraph()
        title = inline_text(raw.strip())
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))
        if title and self.first_title is None:
            self.first_title = title

    def flush_paragraph(self) -> None:
        if self.para:
            text = inline_text("\n".join(self.para)).strip()
            if text:
                self.blocks.append(Block(text, self.path))
        self.para = []

    def flush_code(self) -> None:
        text = "\n".join(self.code).strip("\n")
        if text.strip():
            self.blocks.append(Block(text, self.path))
        self.code = []


def _front_matter(lines: list[str]) -> tuple[str | None, int]:
    """YAML front matter (---\\n...\\n---) at the top: skipped; its `title:` kept."""
    if not lines or lines[0].strip() != "---":
        return None, 0
    for index, line in enumerate(lines[1:60], start=1):
        if line.strip() in ("---", "..."):
            title = None
            for item in lines[1:index]:
                if item.lower().startswith("title:"):
                    title = item.split(":", 1)[1].strip().strip("'\"") or None
            return title, index + 1
    return None, 0


# ---------------------------------------------------------------------------- PDF
_HYPHENATED = textmatch.compile(r"(\w)-\n(\w)")


def parse_pdf(data: bytes, *, max_pages: int, param: str = "document") -> ParsedDocument:
    from pypdf import PdfReader

    if not data[:1024].lstrip().startswith(b"%PDF-"):
        raise ApiError(400, "The document is not a PDF (no %PDF- header).",
                       code="invalid_pdf", param=param)
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ApiError(400, "The PDF is encrypted with a password.", code="invalid_pdf",
                           param=param)
        n_pages = len(reader.pages)
    except ApiError:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files (PdfReadError, ...)
        raise ApiError(400, "The PDF could not be read.", code="invalid_pdf",
                       param=param) from exc
    if n_pages > max_pages:
        raise ApiError(413, f"The PDF has {n_pages} pages; at most {max_pages} are accepted.",
                       code="document_too_large", param=param)
    outline = _outline_by_page(reader)
    blocks: list[Block] = []
    warnings: list[str] = []
    path: tuple[str, ...] = ()
    for index in range(n_pages):
        path = outline.get(index, path)
        try:
            page_text = reader.pages[index].extract_text() or ""
        except Exception:  # one damaged page should not lose the others
            warnings.append(f"page {index + 1}: text could not be extracted")
            continue
        for para in _pdf_paragraphs(page_text):
            blocks.append(Block(para, path, index + 1))
    if warnings and not blocks:
        raise ApiError(400, "The PDF could not be read.", code="invalid_pdf", param=param)
    try:
        title = ((reader.metadata.title or "").strip() or None) if reader.metadata else None
    except Exception:  # damaged info dictionary: no title, the text still counts
        title = None
    return ParsedDocument("application/pdf", blocks, title, len(data), n_pages, warnings)


def _pdf_paragraphs(text: str) -> list[str]:
    text = _HYPHENATED.sub(lambda m: m.group(1) + m.group(2), clean_text(text))
    out = []
    for para in paragraphs(text):
        joined = " ".join(line.strip() for line in para.split("\n") if line.strip())
        if joined:
            out.append(joined)
    return out


def _outline_by_page(reader: object) -> dict[int, tuple[str, ...]]:
    """0-based page -> heading path of the last outline entry starting on that page."""
    entries: list[tuple[int, tuple[str, ...]]] = []

    def walk(items: Iterable[object], parents: tuple[str, ...]) -> None:
        last: tuple[str, ...] = parents
        for item in items:
            if isinstance(item, list):
                walk(item, last)
                continue
            title = str(getattr(item, "title", "") or "").strip()
            try:
                page = reader.get_destination_page_number(item)  # type: ignore[attr-defined]
            except Exception:
                page = None
            last = (*parents, title) if title else parents
            if page is not None and page >= 0 and title:
                entries.append((page, last))

    try:
        walk(reader.outline, ())  # type: ignore[attr-defined]
    except Exception:
        return {}
    by_page: dict[int, tuple[str, ...]] = {}
    for page, path in entries:  # document order: a later entry on a page wins
        by_page[page] = path
    return by_page


# ---------------------------------------------------------------------------- isolation
_pool: ParserPool | None = None


def parse_in_processes(pool: ParserPool | None) -> None:
    """Make `load_document` parse in `pool` (the Retriever replica does this once);
    None: parse in the calling thread again."""
    global _pool
    _pool = pool


def parse_job(data: bytes | str, content_type: str, settings: RagSettings,
              param: str) -> ParsedDocument | dict[str, object]:
    """What a worker process runs (top level: pickled by name). An ApiError comes back as
    its payload: its keyword-only fields would not survive pickling."""
    try:
        return parse(data, content_type, settings=settings, param=param)
    except ApiError as exc:
        return exc.to_payload()


def _warm_up() -> None:
    """Runs first in a new worker, so its start-up does not count against a document."""


class ParserPool:
    """`parse(...)` (the signature of `parse`) in worker processes, one document per worker
    at a time, each within `timeout_s`. A worker past the limit is killed and replaced, so
    a hostile document costs one worker for one time limit and nobody else's upload.

    Each worker is a ProcessPoolExecutor of one process: killing it cannot take another
    document's work down with it. Workers start lazily, from a forkserver (Ray actors are
    threaded, so fork is unsafe). Call `parse` from a thread, never from an event loop.
    """

    def __init__(self, workers: int, timeout_s: float, *, job: Callable[..., object] = parse_job,
                 mp_context: str = "forkserver", start_timeout_s: float = 120.0) -> None:
        import multiprocessing

        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._job = job
        self._context = multiprocessing.get_context(mp_context)
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # started on first use

    def parse(self, data: bytes | str, content_type: str, *,
              settings: RagSettings | None = None, param: str = "document") -> ParsedDocument:
        worker = self._idle.get()  # waits at most one time limit per document ahead
        try:
            worker = worker or _Worker(self._context)
            worker.ready.result(timeout=self.start_timeout_s)
            future = worker.executor.submit(self._job, data, content_type,
                                            settings or RagSettings(), param)
            result = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            worker = _discard(worker)
            raise ApiError(422, f"The document could not be parsed within {self.timeout_s:g} "
                           "s; split it or simplify its markup.", code="parse_timeout",
                           param=param) from None
        except BrokenProcessPool:  # the worker died (memory, a crash in a PDF library)
            worker = _discard(worker)
            raise ApiError(422, "The document could not be parsed.", code="parse_failed",
                           param=param) from None
        finally:
            self._idle.put(worker)
        if is_error_payload(result):
            raise ApiError.from_payload(result)  # type: ignore[arg-type]
        return result  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the idle workers (a busy one ends with its document or with this process)."""
        while True:
            try:
                _discard(self._idle.get_nowait())
            except queue.Empty:
                return


class _Worker:
    def __init__(self, context: object) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=1, mp_context=context)  # type: ignore[arg-type]
        self.ready: Future[None] = self.executor.submit(_warm_up)


def _discard(worker: _Worker | None) -> None:
    """Kill the worker's process (it may be stuck in C code) and let its executor go."""
    if worker is None:
        return None
    kill = getattr(worker.executor, "kill_workers", None)  # Python 3.14+
    if kill is not None:
        kill()
    else:
        for process in list(getattr(worker.executor, "_processes", {}).values()):
            process.kill()
    worker.executor.shutdown(wait=False, cancel_futures=True)
    return None
