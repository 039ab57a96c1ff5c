"""API keys and signed download tokens."""

import base64
import hashlib
import hmac
import secrets
import time
from pathlib import Path

from app.settings import Settings

API_KEY_PREFIX = "rd-"
KEY_PREFIX_LENGTH = 11  # "rd-" and 8 characters: enough to tell keys apart, too little to use


def generate_api_key() -> str:
    # 32 random bytes give 43 URL-safe characters.
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[:KEY_PREFIX_LENGTH]


def hashes_match(stored_hash: str, key: str) -> bool:
    return hmac.compare_digest(stored_hash, hash_api_key(key))


def signing_secret(settings: Settings) -> bytes:
    """Return the configured secret, or one kept in the data directory and made on first use."""
    if settings.signing_secret:
        return settings.signing_secret.encode()
    path = Path(settings.data_dir) / "signing_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.with_suffix(f".{secrets.token_hex(4)}")
        candidate.write_text(secrets.token_urlsafe(48))
        candidate.chmod(0o600)
        try:
            # Link, not rename, so that two processes starting at once keep the first secret.
            path.hardlink_to(candidate)
        except FileExistsError:
            pass
        finally:
            candidate.unlink()
    return path.read_text().strip().encode()


def _signature(secret: bytes, purpose: str, subject: str, expires_at: int) -> str:
    message = f"{purpose}:{subject}:{expires_at}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_token(secret: bytes, purpose: str, subject: str, ttl_s: int) -> str:
    """Return a token that proves `subject` was allowed `purpose` until now + `ttl_s`."""
    expires_at = int(time.time()) + ttl_s
    return f"{expires_at}.{_signature(secret, purpose, subject, expires_at)}"


def verify_token(secret: bytes, purpose: str, subject: str, token: str) -> bool:
    expires_text, _, signature = token.partition(".")
    if not expires_text.isdigit() or not signature:
        return False
    expires_at = int(expires_text)
    if expires_at < time.time():
        return False
    return hmac.compare_digest(signature, _signature(secret, purpose, subject, expires_at))
