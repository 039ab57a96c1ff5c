"""`rundpo-server dev`: the API and one worker together on the embedded defaults."""

import logging
import os
import signal
import subprocess
import sys
import time

from app.migrate import upgrade
from app.settings import get_settings

logger = logging.getLogger(__name__)


def run_dev(host: str, port: int) -> int:
    """Migrate, then run `api` and `worker` as child processes until one exits or Ctrl-C."""
    env = dict(os.environ)
    # A development server trains on the CPU when the host has no GPU, unless
    # RUNDPO_ALLOW_CPU_TRAINING is already set.
    env.setdefault("RUNDPO_ALLOW_CPU_TRAINING", "true")
    env.setdefault("RUNDPO_PUBLIC_URL", f"http://{host}:{port}")
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.database_url)

    command = [sys.executable, "-m", "app.cli"]
    children = [
        subprocess.Popen([*command, "api", "--host", host, "--port", str(port)], env=env),
        subprocess.Popen([*command, "worker"], env=env),
    ]
    logger.info(
        "serving on http://%s:%d with data in %s (Ctrl-C stops)", host, port, settings.data_dir
    )

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        exit_code = next(child.returncode for child in children if child.poll() is not None)
        logger.error("a child process exited with code %s; stopping", exit_code)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    return exit_code
