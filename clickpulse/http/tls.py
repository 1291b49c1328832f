"""Optional TLS on the public listener (TLS_CERT_FILE, TLS_KEY_FILE), for those without a proxy
in front. The context is made once; SIGHUP loads the files again into the same context, so new
connections get the new certificate and open ones keep theirs. A bad pair keeps the old one."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from clickpulse.config import ConfigError

log = logging.getLogger("clickpulse.http")


class TlsFiles:
    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self._load()
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"invalid TLS_CERT_FILE/TLS_KEY_FILE ({cert_file}, {key_file}): {_reason(error)}") from None

    def _load(self) -> None:
        self.context.load_cert_chain(self.cert_file, self.key_file)

    def reload(self) -> bool:
        try:
            self._load()
        except (OSError, ssl.SSLError) as error:
            log.warning("SIGHUP: keeping the TLS certificate in use: %s: %s", self.cert_file, _reason(error))
            return False
        log.info("SIGHUP: TLS certificate loaded from %s", self.cert_file)
        return True


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
