# The production image. Its CMD is THE production command (README "Running in production" repeats it);
# tests/test_dockerfile.py reads this file and tests/test_restart.py runs that CMD.
FROM python:3.11-slim

# Logs reach stderr as they are written; pip skips its version check.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies first, in a layer of their own: it is rebuilt only when the lock changes, and pip
# refuses any file whose hash is not in the lock.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

# A numeric, non-root user (Kubernetes' runAsNonRoot can only verify a number). It owns nothing in /app:
# the code stays read-only to the service.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app

# The service: every top-level module (gunicorn.conf.py among them), the routes, and the migrations it
# runs at start-up.
COPY *.py alembic.ini ./
COPY routes/ routes/
COPY migrations/ migrations/
# Byte-compiled here, as root: the workers could not write __pycache__ into /app and would compile
# every module again at every start.
RUN python -m compileall -q .

USER 10001:10001
EXPOSE 8000
# No curl in a slim image: Python itself asks /health, and any answer but 200 (or none) fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# The production command: gunicorn's master with uvicorn workers, every option in gunicorn.conf.py (copied
# with the modules above). SIGTERM (Docker's default, stated here) closes the listening socket at once (new
# connections are refused), lets requests in flight finish for at most graceful_timeout (25 s; why, in
# gunicorn.conf.py), closes the database connections and exits 0. Give the container at least 30 s
# (`docker stop -t 30`, compose `stop_grace_period: 30s`; Kubernetes' default terminationGracePeriodSeconds is 30).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "main:app", "--config", "gunicorn.conf.py"]
