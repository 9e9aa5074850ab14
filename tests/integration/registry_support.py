"""Helpers for tests that need a real registry with token authentication: signing keys
(made with the cryptography package), a registry configuration, and a ``docker-registry``
process of the test's own on a port of its choosing.

A plain module rather than fixtures, so each test decides the realm its registry points
at (a small token app, or a whole gateway).
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REGISTRY_BIN = "docker-registry"


def make_token_keys(directory: Path) -> tuple[Path, Path]:
    """An RSA 2048 key and its self-signed certificate (10 years) as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagefn test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_path = directory / "token.key"
    cert_path = directory / "token.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def write_registry_config(
    directory: Path,
    port: int,
    realm_url: str,
    service: str,
    issuer: str,
    cert_path: Path,
    storage_dir: Path,
    delete_enabled: bool = True,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    storage_dir.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yml"
    path.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage_dir}\n"
        "  delete:\n"
        f"    enabled: {'true' if delete_enabled else 'false'}\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        "auth:\n"
        "  token:\n"
        f"    realm: {realm_url}\n"
        f"    service: {service}\n"
        f"    issuer: {issuer}\n"
        f"    rootcertbundle: {cert_path}\n"
    )
    return path


def _v2_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def start_registry(config_path: Path, port: int, timeout_s: float = 20) -> subprocess.Popen[bytes]:
    """Starts ``docker-registry serve`` and waits until /v2/ answers 401 (token auth on).
    Its log goes next to the configuration (``registry.log``)."""
    exe = shutil.which(REGISTRY_BIN)
    if exe is None:
        raise RuntimeError("docker-registry is not installed; run deploy/setup.sh first")
    log_path = config_path.parent / "registry.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [exe, "serve", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout_s
    while (status := _v2_status(port)) != 401:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_registry(proc)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"the registry did not answer 401 on port {port} ({status}):\n{tail}"
            )
        time.sleep(0.05)
    return proc


def stop_registry(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
