"""A throwaway PKI for TLS tests, made with the `openssl` CLI (Debian package `openssl`).

`make_pki(directory)` writes, in a few hundred milliseconds:

- a CA, and a server certificate it signed for `localhost` and `127.0.0.1`;
- a client certificate (CN `fieldlink-test-client`) it signed, and its key encrypted
  with a passphrase (which a service cannot type);
- an expired client certificate and an expired server certificate it signed
  (valid 2020-01-01 to 2020-01-02);
- a second, unrelated "wrong" CA, as a trust store that must not verify the server,
  and a client certificate it signed, which the first CA's broker must refuse.

Everything is signed with `openssl ca`, not `openssl x509 -req`: OpenSSL 3.0 has no
way to set an arbitrary validity window with `x509`, and an expired certificate
is the point of one of the files. Keys are EC P-256: generated in milliseconds,
and accepted by mosquitto and Python's ssl module alike.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.rig.servers import require_binary

SERVER_HOSTS = ("localhost", "127.0.0.1")
CLIENT_CN = "fieldlink-test-client"
EXPIRED_CN = "fieldlink-expired-client"

_CA_CONF = """\
[ca]
default_ca = rig_ca

[rig_ca]
dir = {dir}
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir/issued
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
policy = rig_policy
unique_subject = no
# Keep the request's subject order and never prompt: this runs unattended.
preserve = yes
email_in_dn = no

[rig_policy]
commonName = supplied

[req]
distinguished_name = req_dn
prompt = no

[req_dn]
CN = placeholder

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}

[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Paths of everything `make_pki` wrote."""

    ca: Path  # the CA certificate that signed server, client and expired
    server: CertPair  # for localhost and 127.0.0.1
    client: CertPair
    client_key_encrypted: Path  # client.key under the passphrase "secret"
    expired_client: CertPair  # signed by `ca`, notAfter in 2020
    expired_server: CertPair  # for the same names as `server`, notAfter in 2020
    wrong_ca: Path  # an unrelated CA certificate: trusts nothing here
    foreign_client: CertPair  # signed by `wrong_ca`
    directory: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    binary = require_binary("openssl", "openssl")
    done = subprocess.run([binary, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr}")


def _new_key(path: Path, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path, cwd=cwd)
    path.chmod(0o600)


def _new_ca(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A self-signed CA in its own directory, with the files `openssl ca` keeps: (config, certificate)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "issued").mkdir(exist_ok=True)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("1000\n")
    conf = directory / "ca.cnf"
    conf.write_text(_CA_CONF.format(dir=directory, san=san))
    key, cert = directory / "ca.key", directory / "ca.pem"
    _new_key(key, directory)
    _openssl(
        "req", "-x509", "-new", "-config", conf, "-key", key, "-subj", f"/CN=fieldlink test {name}",
        "-days", "3650", "-extensions", "v3_ca", "-out", cert, cwd=directory,
    )  # fmt: skip
    return conf, cert


def _issue(conf: Path, name: str, cn: str, extensions: str, start: str, end: str) -> CertPair:
    """A key and a certificate signed by the CA of `conf`, valid from `start` to `end` (YYYYMMDDHHMMSSZ)."""
    directory = conf.parent
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _new_key(key, directory)
    _openssl("req", "-new", "-config", conf, "-key", key, "-subj", f"/CN={cn}", "-out", csr, cwd=directory)
    _openssl(
        "ca", "-batch", "-notext", "-config", conf, "-extensions", extensions,
        "-startdate", start, "-enddate", end, "-in", csr, "-out", cert, cwd=directory,
    )  # fmt: skip
    return CertPair(cert, key)


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, server, client, expired client and an unrelated CA under `directory`."""
    san = ", ".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in SERVER_HOSTS)
    conf, ca = _new_ca(directory, "ca", san)
    # A window wide enough that neither clock skew nor a long-lived CI image matters;
    # only the expired certificate has a window in the past.
    valid = ("20200101000000Z", "20991231235959Z")
    server = _issue(conf, "server", "localhost", "server_ext", *valid)
    client = _issue(conf, "client", CLIENT_CN, "client_ext", *valid)
    encrypted = directory / "client-encrypted.key"
    _openssl("pkey", "-in", client.key, "-aes256", "-passout", "pass:secret", "-out", encrypted, cwd=directory)
    past = ("20200101000000Z", "20200102000000Z")
    expired = _issue(conf, "expired-client", EXPIRED_CN, "client_ext", *past)
    expired_server = _issue(conf, "expired-server", "localhost", "server_ext", *past)

    wrong_conf, wrong_ca = _new_ca(directory / "wrong", "wrong-ca", san)
    foreign = _issue(wrong_conf, "foreign-client", CLIENT_CN, "client_ext", *valid)
    return Pki(
        ca=ca,
        server=server,
        client=client,
        client_key_encrypted=encrypted,
        expired_client=expired,
        expired_server=expired_server,
        wrong_ca=wrong_ca,
        foreign_client=foreign,
        directory=directory,
    )
