"""Reading a request's body: JSON only, bounded in size and in time. Apart from the handlers, so
every endpoint that takes a body (generation, adapters, keys) reads it the same way."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from dlora.services.gateway.errors import error_response
from dlora.services.gateway.openai import APIError

# The codings a body may come in, decoded here by zlib. Not by aiohttp: its parser answers any
# other coding it knows (br, zstd without their packages) with a plain-text 400 before a handler
# runs, which the OpenAI client cannot read (a user's trial); the server runs with
# ``auto_decompress=False`` (``connections.listen``).
CODINGS = ("identity", "gzip", "deflate")
# zlib's window bits per coding: gzip's header, and deflate as RFC 9110 8.4.1.2 defines it (zlib's);
# a "deflate" body without zlib's header is read raw, as aiohttp and browsers do (.NET's
# DeflateStream sends such).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_ZLIB_METHOD = 8  # a zlib stream's first byte names this method in its low four bits
# gzip members one body may hold: each is a decoder and a copy of the rest (a review: 50,000 empty
# members in 1 MB held the event loop 1.1 s). Clients send one.
MAX_GZIP_MEMBERS = 64


def _too_large(length: int, limit: int) -> APIError:
    return APIError(413, f"request body of {length} bytes exceeds the limit of {limit}")


def expect_continue(limit: int) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """A POST route's ``expect_handler``: ``Expect: 100-continue`` is answered 100 only for a body
    ``limit`` takes (aiohttp's own sent 100 for any, and curl uploaded a 3 MB body to hear 413: RFC
    9110 10.1.1 lets a server answer the final status instead, as nginx does), and an Expect it
    does not know gets a 417 in OpenAI's error shape (aiohttp's was plain text). A refusal closes
    the connection: the body may come all the same."""

    async def handler(request: web.Request) -> web.StreamResponse | None:
        expect = request.headers.get(hdrs.EXPECT, "")
        if request.version != HttpVersion11:  # HTTP/1.0 has no Expect, and no 1xx may go to it (RFC 9110 15.2)
            return None
        if expect.lower() != "100-continue":
            refusal = APIError(417, f"Expect {expect[:64]!r} is not supported; send 'Expect: 100-continue' or none")
        elif request.content_length is not None and request.content_length > limit:
            refusal = _too_large(request.content_length, limit)
        else:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response's own bytes count from here (aiohttp's access log)
            return None
        response = error_response(refusal)
        response.force_close()
        return response

    return handler


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The whole JSON body, up to ``limit`` bytes, within ``timeout_s`` seconds.

    Raises:
        APIError(415): the Content-Type is not application/json (a browser cannot send that
            cross-site without a CORS preflight, which this server never grants).
        APIError(413): the body is longer than ``limit``.
        APIError(408): the body did not all come within ``timeout_s`` (a client trickling it
            would hold a connection and a handler for as long as it liked).
        APIError(415): a Content-Encoding other than ``CODINGS``.
        APIError(400): a body its Content-Encoding does not decode, or cut short.
        APIError(413): a body decoded longer than ``limit`` (a gzip bomb is cut at the limit).
    """
    if request.content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {request.content_type!r}")
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in CODINGS:  # aiohttp would read an unknown one as plain bytes (RFC 9110 15.5.16: a 415)
        raise APIError(415, f"Content-Encoding {coding!r} is not supported; send {', '.join(CODINGS)}")
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            # Every chunk to the end: one read returns only what has arrived, and a large body comes in many.
            async for chunk in request.content.iter_any():
                raw += chunk
                if len(raw) > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    except RequestPayloadError as e:  # a body its framing does not hold (it was a 500)
        # the rest of such a body cannot be told from a next request: the connection ends here
        raise APIError(400, f"the request body cannot be read: {e}", headers={"Connection": "close"}) from None
    return _decoded(bytes(raw), coding, limit)


def _decoded(raw: bytes, coding: str, limit: int) -> bytes:
    """``raw`` decoded from ``coding``, at most ``limit`` bytes of it (APIError 413 beyond, 400 for
    bytes that are not that coding or end early)."""
    if coding not in _WBITS:
        return raw
    wbits = _WBITS[coding]
    if coding == "deflate" and raw and raw[0] & 0x0F != _ZLIB_METHOD:
        wbits = -zlib.MAX_WBITS
    out = b""
    for _ in range(MAX_GZIP_MEMBERS):  # gzip members one after another make one body (RFC 1952 2.2)
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(raw, limit + 1 - len(out))  # a bomb stops a byte past the limit
            if len(out) <= limit:
                out += decoder.flush()
        except zlib.error as e:
            raise APIError(400, f"the request body cannot be read: it is not {coding} ({e})") from None
        if len(out) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes once decoded ({coding})")
        if not decoder.eof:
            raise APIError(400, f"the request body cannot be read: its {coding} data ends early")
        raw = decoder.unused_data
        if not raw.strip(b"\0"):  # the end (zeros after it: padding, which gzip readers skip)
            return out
        if coding != "gzip":
            raise APIError(400, f"the request body cannot be read: bytes after its {coding} data")
    raise APIError(400, f"the request body cannot be read: more than {MAX_GZIP_MEMBERS} gzip members")
