# beliefstore: one image for the `api`, `projector` and `migrate` commands.
#   docker build -t beliefstore .
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=... -e DATABASE_URL=... -p 8000:8000 beliefstore
# Configuration comes only from the environment (see beliefstore/settings.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the project (not editable) from the checkout; .dockerignore keeps the
# virtualenv, git data, caches, tests and local service data out of the context.
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src

# Run as an unprivileged user; its home is the working directory, so the
# default BELIEFSTORE_HOME (./.beliefstore) is writable.
RUN useradd --create-home --home-dir /home/beliefstore --uid 10001 --shell /usr/sbin/nologin beliefstore
USER beliefstore
WORKDIR /home/beliefstore

EXPOSE 8000
CMD ["beliefstore", "api", "--host", "0.0.0.0"]
