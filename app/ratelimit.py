"""Per-API-key rate limits in fixed one-minute windows.

With a Redis URL the counters live in Redis and every API process shares them; without
one each process counts on its own, so the effective limit is per process.
"""

import logging
import threading
import time

logger = logging.getLogger(__name__)

WINDOW_S = 60


class RateLimiter:
    def __init__(self, redis_url: str = "") -> None:
        self._redis = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2)
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def hit(self, bucket: str, limit: int) -> int | None:
        """Count one request in `bucket`; return seconds to wait when over `limit`, else None."""
        if limit <= 0:
            return None
        now = time.time()
        window = int(now // WINDOW_S)
        retry_after = max(1, int((window + 1) * WINDOW_S - now))

        if self._redis is not None:
            count = self._hit_redis(f"rundpo:rate:{bucket}:{window}")
            if count is not None:
                return retry_after if count > limit else None

        with self._lock:
            stored_window, count = self._counts.get(bucket, (window, 0))
            count = count + 1 if stored_window == window else 1
            self._counts[bucket] = (window, count)
        return retry_after if count > limit else None

    def _hit_redis(self, key: str) -> int | None:
        import redis

        try:
            pipe = self._redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, WINDOW_S * 2)
            count, _ = pipe.execute()
            return int(count)
        except redis.RedisError as exc:
            # Falling back to the process's own counters keeps the API up while Redis is down.
            logger.warning("rate limit counters in Redis unavailable, counting locally: %s", exc)
            return None
