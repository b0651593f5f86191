"""The service's logging (LOG_LEVEL, LOG_FORMAT): today's text lines, or one JSON object per line for every
record of every logger, uvicorn's own included.

Either way a record is one line (a traceback, in text, is indented under it), and nothing a client sends can
start another: control characters are escaped. The access record's structured fields (`method`, `route`,
`path`, `status`, `duration_ms`, `request_id`, `user_id`) come from RequestContextMiddleware as `extra=`.
"""

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

# The name of the handler installed here, so that configuring again (each create_app) replaces it.
HANDLER_NAME = "todo-stderr"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Only these attributes of a record become JSON fields, besides the base ones: whatever else a library
# attaches to a record (uvicorn's `color_message`, say) stays out.
REQUEST_FIELDS = ("method", "route", "path", "status", "duration_ms", "request_id", "user_id")
# Where a traceback's lines start in text: under their record, so that only a record's first line
# starts at the margin, and no line of an exception's message can pass for a record of its own.
TRACEBACK_INDENT = "    "

# Every character that ends a line (for `str.splitlines()` or a terminal) or drives a terminal: C0 and C1
# controls, DEL, Unicode's line and paragraph separators.
_LINE_BREAKERS = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_LINE_BREAK_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _LINE_BREAKERS}
# Text a client chose (a request's path) also has its backslashes escaped, so that it cannot write an
# escape that passes for one of ours; the formatters keep backslashes, so such text is not escaped twice.
_CLIENT_TEXT_ESCAPES = _LINE_BREAK_ESCAPES | {ord("\\"): "\\\\"}


def escape_line_breaks(text: str) -> str:
    """`text` with every control character escaped (backslashes kept): it fits on one line."""
    if text.isprintable():  # the usual path: nothing to do
        return text
    return text.translate(_LINE_BREAK_ESCAPES)


def escape_client_text(text: str) -> str:
    """Client-chosen `text` for a log message: control characters and backslashes escaped."""
    if text.isprintable() and "\\" not in text:  # the usual path: nothing to do
        return text
    return text.translate(_CLIENT_TEXT_ESCAPES)


def record_message(record: logging.LogRecord) -> str:
    """The record's message; a message whose arguments do not fit its format is shown unformatted.

    logging would otherwise print its own multi-line complaint to stderr, which is not a log line.
    """
    try:
        return record.getMessage()
    except Exception:  # any mistake in a logging call: keep the record, not the complaint
        return f"{record.msg} (arguments that do not fit the message: {len(record.args or ())})"


class TextFormatter(logging.Formatter):
    """Today's `time level logger: message` lines, with the message's control characters escaped and a
    traceback's lines (kept, escaped within) indented under their record."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """One line for the record, then its traceback and stack, if any, indented under it."""
        record.message = escape_line_breaks(record_message(record))
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:  # cached unescaped, as logging does, for other handlers
            record.exc_text = self.formatException(record.exc_info)
        for detail in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if detail:
                text += "".join(f"\n{TRACEBACK_INDENT}{escape_line_breaks(line)}" for line in detail.split("\n"))
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: `time` (ISO 8601, UTC), `level`, `logger`, `message`, the
    request fields the record carries, and `exc_info` / `stack_info` as single strings.

    ASCII only: json.dumps then escapes every control character, DEL and U+2028/U+2029 (with ensure_ascii=False
    it would keep U+2028/U+2029 as they are, and some readers end a line there).
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record_message(record),
        }
        fields = record.__dict__
        for name in REQUEST_FIELDS:
            if name in fields:
                entry[name] = fields[name]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


class WebSocketQueryFilter(logging.Filter):
    """Drops the query string from uvicorn's WebSocket handshake lines (`"WebSocket /path?query" 403`).

    The service has no WebSocket routes, yet uvicorn logs every handshake attempt with its query string,
    which is the client's to fill, with a token as likely as anything.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record, its path argument cut at `?`."""
        arguments = record.args
        if (
            isinstance(record.msg, str)
            and '"WebSocket %s"' in record.msg
            and isinstance(arguments, tuple)
            and len(arguments) >= 2
            and isinstance(arguments[1], str)
        ):
            record.args = (arguments[0], arguments[1].partition("?")[0], *arguments[2:])
        return True


def configure_logging(level: str, log_format: Literal["text", "json"] = "text") -> None:
    """Send the logs to stderr: the service's at `level`, in `log_format`; uvicorn's access log gives way to ours.

    `text`: the service's loggers get today's lines; uvicorn and other libraries keep their own output.
    `json`: one handler at the root takes every logger's records (uvicorn's, whose own handlers are removed,
    and Python's warnings too). Call it after uvicorn has configured its logging (create_app runs when
    uvicorn imports the app, after that), so that this configuration wins.
    """
    service = logging.getLogger("todo")
    root = logging.getLogger()
    for owner in (service, root):  # a previous call's handler (several apps in one process, as in tests)
        for handler in [each for each in owner.handlers if each.get_name() == HANDLER_NAME]:
            owner.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler()  # stderr
    handler.set_name(HANDLER_NAME)
    service.setLevel(level.upper())
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(each, WebSocketQueryFilter) for each in uvicorn_error.filters):
        uvicorn_error.addFilter(WebSocketQueryFilter())
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.disabled = True
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        service.propagate = True
        for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):  # uvicorn's text handlers give way
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
        uvicorn_access.handlers.clear()
        uvicorn_access.propagate = False  # so uvicorn does not even build its access line
        logging.captureWarnings(True)  # a warning is printed as a record, not as lines of its own
    else:
        handler.setFormatter(TextFormatter())
        service.addHandler(handler)
        service.propagate = False
        logging.captureWarnings(False)
