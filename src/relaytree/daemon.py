"""`relaytree serve`: configuration, logging, start-up checks, then the relay server."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from dataclasses import fields
from typing import Any, Dict

from relaytree import server

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.9/3.10 nodes
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("relaytree.daemon")

# Config keys that map straight onto server.Settings; sections are handled by name.
_SCALARS = {f.name: f.type for f in fields(server.Settings) if f.name != "extra"}
_SECTIONS = ("tls", "auth")


class ConfigError(Exception):
    pass


def load_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config %s is not valid TOML: %s" % (path, exc)) from None
    unknown = sorted(k for k in data if k not in _SCALARS and k not in _SECTIONS)
    if unknown:
        raise ConfigError("config %s: unknown key(s) %s" % (path, ", ".join(unknown)))
    return data


def settings_from(args, config: Dict[str, Any]) -> server.Settings:
    settings = server.Settings()
    for key, value in config.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError("config: [%s] must be a table" % key)
            settings.extra[key] = value
            continue
        default = getattr(settings, key)
        expected = type(default) if default is not None else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError("config: %s must be %s, got %r" % (key, expected.__name__, value))
        setattr(settings, key, value)
    # Command-line flags win over the file.
    for key in ("listen", "state_dir", "base_dir", "log_level"):
        value = getattr(args, key, None)
        if value:
            setattr(settings, key, value)
    if getattr(args, "insecure", False):
        settings.insecure = True
    if settings.base_dir:
        settings.base_dir = os.path.abspath(settings.base_dir)
        if not os.path.isdir(settings.base_dir):
            raise ConfigError("base dir %s is not a directory" % settings.base_dir)
    if settings.chunk_window < 1 or settings.max_concurrent_rpcs < 1:
        raise ConfigError("chunk_window and max_concurrent_rpcs must be at least 1")
    return settings


def _node_names(settings: server.Settings, configured) -> list:
    """The names this node answers to in a request's scope: configured ones, the
    hostname (short and full) and the address it listens on."""
    names = [str(n) for n in configured or ()]
    host = socket.gethostname()
    names += [host, host.split(".")[0], socket.getfqdn()]
    listen_host = settings.listen.rsplit(":", 1)[0].strip("[]")
    if listen_host not in ("", "0.0.0.0", "::"):
        names.append(listen_host)
    return [n for n in dict.fromkeys(names) if n]


def security(settings: server.Settings):
    """(server credentials, channel credentials, verifier) from [tls] and [auth];
    (None, None, None) in insecure mode, which says so loudly."""
    if settings.insecure:
        log.warning("INSECURE MODE: plaintext gRPC and unsigned requests are accepted. Anyone "
                    "who can reach %s can run commands as this daemon's user. Use only for "
                    "local experiments.", settings.listen)
        return None, None, None
    tls = settings.extra.get("tls")
    if not tls:
        raise ConfigError(
            "no TLS material configured: set [tls] cert, key and ca in the config file "
            "(see `relaytree keys`), or pass --insecure for a local experiment")
    conf = dict(settings.extra.get("auth") or {})
    if not conf.get("trusted_keys"):
        raise ConfigError("no trusted controller keys: set [auth] trusted_keys in the config file "
                          "(the controller's signing/controller.pub)")
    from relaytree import auth, keys  # cryptography is only needed in secure mode
    try:
        server_creds = keys.server_credentials(tls["cert"], tls["key"], tls["ca"])
        channel_creds = keys.channel_credentials(tls["cert"], tls["key"], tls["ca"])
    except KeyError as exc:
        raise ConfigError("config [tls] lacks %s" % exc) from None
    unknown = set(conf) - {"trusted_keys", "node_names", "clock_skew", "max_validity", "policy"}
    if unknown:
        raise ConfigError("config [auth]: unknown key(s) %s" % ", ".join(sorted(unknown)))
    try:
        verifier = auth.Verifier(
            conf["trusted_keys"], auth.Policy.from_dict(conf.get("policy") or {}),
            node_names=_node_names(settings, conf.get("node_names")),
            clock_skew=float(conf.get("clock_skew", 30)),
            max_validity=float(conf.get("max_validity", 2 * 86400)),
            nonce_file=os.path.join(settings.state_dir, "nonces"))
    except (ValueError, TypeError, keys.KeysError) as exc:
        raise ConfigError("config [auth]: %s" % exc) from None
    return server_creds, channel_creds, verifier


def main(args) -> int:
    try:
        config = load_config(args.config) if args.config else {}
        settings = settings_from(args, config)
    except ConfigError as exc:
        print("relaytree serve: %s" % exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s relaytreed[%(process)d] %(levelname)s %(message)s")
    try:
        os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        print("relaytree serve: cannot create state dir %s: %s" % (settings.state_dir, exc.strerror),
              file=sys.stderr)
        return 2
    try:
        credentials, channel_credentials, verifier = security(settings)
    except Exception as exc:  # noqa: BLE001 - any bad key material is a start-up error
        print("relaytree serve: %s" % exc, file=sys.stderr)
        return 2
    server.tune_malloc()
    try:
        asyncio.run(server.serve(settings, credentials, channel_credentials, verifier))
    except OSError as exc:
        print("relaytree serve: %s" % exc, file=sys.stderr)
        return 1
    return 0
