"""Keeping secrets out of every log line, traceback, run record and reply.

Secrets (platform tokens, the OpenAI key, the database password) are registered with :data:`REDACTOR` wherever
settings enter the process (logging set-up, the store, the service, the improvement loop, each adapter).
:func:`install` then scrubs them at the one place every log record passes through, the record factory: the
message, and the formatted traceback when an exception's text carries a secret (handlers render ``exc_info``
themselves, some with rich formatting, so such a record gets the redacted text instead of ``exc_info``). Filters
on loggers would miss records that propagate from child loggers created later; the factory sees them all. Python's
last-resort hooks (uncaught exceptions in the main thread and in threads) print through it too.

Text that leaves the process another way (a child step's log file, a run's error, a command reply) goes through
:func:`redact` explicitly.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from bot.settings import Settings

MASK = "<redacted>"
#: Shorter values are not replaced wherever they occur (a 3-letter password would garble every log line);
#: inside a URL they are still masked by :data:`_URL_PASSWORD`.
MIN_SECRET_LENGTH = 6
#: ``scheme://user:password@host``: the password of any URL, registered or not.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s/]+)@")
_SECRET_VARIABLES = ("TELEGRAM_TOKEN", "DISCORD_TOKEN", "OPENAI_API_KEY", "ADMIN_TOKEN", "TELEGRAM_WEBHOOK_SECRET")


class Redactor:
    """The set of secret values of this process and the function that masks them in text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def add(self, value: str | None) -> None:
        """Register a secret value (ignored if empty or too short to mask safely)."""
        if value is None or len(value.strip()) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            if value not in self._secrets:
                # Longest first, so a secret that contains another is masked whole.
                self._secrets = tuple(sorted({*self._secrets, value}, key=len, reverse=True))

    def add_database_url(self, url: str | None) -> None:
        """Register the password of a database URL."""
        if not url:
            return
        try:
            password = make_url(url).password
        except Exception:  # an unparsable URL has nothing we can pick out; the URL pattern still applies
            return
        if password:
            self.add(str(password))

    def add_settings(self, settings: Settings) -> None:
        """Register every secret a :class:`~bot.settings.Settings` holds."""
        secrets = (
            settings.telegram_token,
            settings.discord_token,
            settings.openai_api_key,
            settings.admin_token,
            settings.telegram_webhook_secret,
        )
        for secret in secrets:
            if secret is not None:
                self.add(secret.get_secret_value())
        self.add_database_url(settings.database_url)

    def add_environment(self, environ: Mapping[str, str] | None = None) -> None:
        """Register the secrets of the environment (what a child step receives from the server)."""
        environ = os.environ if environ is None else environ
        for name in _SECRET_VARIABLES:
            self.add(environ.get(name))
        self.add_database_url(environ.get("DATABASE_URL"))

    @property
    def secrets(self) -> tuple[str, ...]:
        """The registered values (for tests that assert none of them leaked)."""
        return self._secrets

    def redact(self, text: str) -> str:
        """``text`` with every registered secret and every URL password replaced by :data:`MASK`."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text) if "://" in text else text


REDACTOR = Redactor()


def redact(text: str) -> str:
    """:meth:`Redactor.redact` of the process-wide :data:`REDACTOR`."""
    return REDACTOR.redact(text)


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask secrets in a log record's message, traceback and stack, in place."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: logging reports it itself when a handler formats it
        return record
    clean = redact(message)
    if clean != message or (record.exc_info and record.exc_info[1] is not None):
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[1] is not None:
        formatted = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        redacted = redact(formatted)
        if redacted != formatted:
            record.msg = f"{record.msg}\n{redacted}"
            record.exc_info, record.exc_text = None, None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Scrub every log record of this process and the last-resort traceback hooks (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        factory = logging.getLogRecordFactory()

        def scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return scrub_record(factory(*args, **kwargs))

        logging.setLogRecordFactory(scrubbing_factory)
        previous_hook = sys.excepthook

        def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            text = "".join(traceback.format_exception(kind, value, tb))
            if redact(text) == text:
                previous_hook(kind, value, tb)
            else:
                sys.stderr.write(redact(text))

        sys.excepthook = excepthook
        previous_thread_hook = threading.excepthook

        def thread_excepthook(hook_args: threading.ExceptHookArgs) -> None:
            text = "".join(traceback.format_exception(hook_args.exc_type, hook_args.exc_value, hook_args.exc_traceback))
            if redact(text) == text:
                previous_thread_hook(hook_args)
            else:
                sys.stderr.write(f"Exception in thread {getattr(hook_args.thread, 'name', '?')}:\n{redact(text)}")

        threading.excepthook = thread_excepthook


def protect(settings: Settings | None = None) -> None:
    """Register ``settings``' secrets and the environment's, and make sure records are scrubbed."""
    if settings is not None:
        REDACTOR.add_settings(settings)
    REDACTOR.add_environment()
    install()


def redact_file(path: os.PathLike[str] | str) -> bool:
    """Rewrite a text file (a child step's log) with secrets masked; returns whether anything changed."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as stream:
            text = stream.read()
    except OSError:
        return False
    clean = redact(text)
    if clean == text:
        return False
    temporary = f"{path}.redacting"
    with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as stream:
        stream.write(clean)
    os.replace(temporary, path)
    return True
